"""Evaluation through mteb on local data: teacher, student and asymmetric mode (student queries, teacher
documents), each at Matryoshka dims and output quantizations, plus the student's agreement with the teacher.

How mteb is used. mteb's own tasks download from the Hub, so tasks here are AbsTaskRetrieval / AbsTaskSTS
subclasses whose `load_data` serves local files (any BEIR folder; the STS Benchmark folder). Every encoder
embeds a dataset's texts once (`encode_once`); each (mode, dims, quantization) variant is derived from those
vectors (truncate + renormalise, then quantize) and handed to `mteb.evaluate` as a model that serves them:
for retrieval a SearchProtocol (it ranks by dot product, mteb scores the run with pytrec_eval), for STS an
EncoderProtocol (mteb computes the correlations). So mteb never re-encodes, and the ranking mteb scores is the
one the agreement metrics (overlap@10) use. Every variant gets a unique model name and `cache=None`, so
results never mix. mteb rounds its retrieval means to 5 decimals; the tasks report the same per-query
pytrec_eval scores averaged at full precision instead.

Quantization is symmetric (queries and documents both quantized; what a stored-and-compared index does):
int8 maps each dimension's range, calibrated on the document side's vectors (the corpus), to 256 levels and
scores with the dequantized values; binary keeps the sign and scores with the dot product of +-1 vectors,
which is dims - 2 * hamming distance (the same ranking as hamming).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from leaf_ray.config import DataConfig, EvalConfig, TeacherConfig
from leaf_ray.data import DataError, read_beir_corpus, read_jsonl
from leaf_ray.errors import LeafRayError

log = logging.getLogger(__name__)

# (texts, ids, kind) -> float32 [len(texts), dim]. Ids let a source serve cached vectors (the teacher cache).
VectorSource = Callable[[list[str], list[str], str], np.ndarray]
# mode -> (encoder of the queries, encoder of the documents); STS: sentence1 is the query side.
MODES: dict[str, tuple[str, str]] = {
    "teacher": ("teacher", "teacher"),
    "student": ("student", "student"),
    "asymmetric": ("student", "teacher"),
}
QUANTIZATION_BITS = {"float32": 32, "int8": 8, "binary": 1}
RETRIEVAL_METRICS = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "map_at_10")
RETRIEVAL_K = (1, 3, 5, 10, 100)
STS_METRICS = ("cosine_spearman", "cosine_pearson")
OVERLAP_K = 10
# pytrec_eval measure -> mteb score key prefix (mteb's `make_score_dict` naming).
_PYTREC_KEYS = {"ndcg_cut": "ndcg_at", "map_cut": "map_at", "recall": "recall_at", "P": "precision_at",
                "success": "hit_rate_at"}


class EvaluationError(LeafRayError, ValueError):
    """Evaluation inputs that cannot give meaningful numbers; the message says which and why."""


# ---------------------------------------------------------------------------------------------- local data


@dataclass
class RetrievalData:
    """One split of a BEIR folder, checked: every oddity in the qrels is counted in `issues`, never dropped
    silently. Qrels naming unknown queries cannot be run and are left out; qrels naming unknown documents stay
    (a relevant document the corpus lacks is a miss every encoder pays for)."""

    name: str
    split: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    issues: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split, "task": "retrieval", "documents": len(self.corpus_ids),
                "queries": len(self.query_ids), "qrels": sum(len(d) for d in self.qrels.values()), **self.issues}


@dataclass
class STSData:
    name: str
    split: str
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split, "task": "sts", "pairs": len(self.scores)}


def _read_qrels(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip() or (lineno == 1 and line.startswith("query-id")):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score)")
            try:
                rows.append((parts[0], parts[1], int(float(parts[2]))))
            except ValueError:
                raise DataError(f"{path}:{lineno}: score {parts[2]!r} is not a number") from None
    return rows


def load_beir(folder: Path, split: str = "test", max_corpus: int | None = None, max_queries: int | None = None,
              seed: int = 0, name: str | None = None) -> RetrievalData:
    """Read a BEIR folder's split; optional seeded subsamples keep every document judged for a kept query.
    `name` (default: the folder's) is what results call the dataset."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise EvaluationError(f"{folder}: no qrels for split {split!r} ({qrels_path} missing; splits found: {found})")
    corpus = read_beir_corpus(folder)
    if not corpus:
        raise EvaluationError(f"{folder / 'corpus.jsonl'}: the corpus is empty; retrieval needs documents")
    doc_text = {doc_id: text for doc_id, text, _ in corpus}
    if len(doc_text) != len(corpus):
        raise EvaluationError(f"{folder / 'corpus.jsonl'}: {len(corpus) - len(doc_text)} duplicate document ids")
    query_text = {qid: text for qid, text, _ in read_jsonl(folder / "queries.jsonl", "_id", "text",
                                                           default_kind="query")}
    issues = {"unknown_query_qrels": 0, "unknown_document_qrels": 0}
    qrels: dict[str, dict[str, int]] = {}
    for qid, doc_id, score in _read_qrels(qrels_path):
        if qid not in query_text:
            issues["unknown_query_qrels"] += 1
            continue
        issues["unknown_document_qrels"] += doc_id not in doc_text
        qrels.setdefault(qid, {})[doc_id] = score
    if not qrels:
        raise EvaluationError(f"{qrels_path}: no qrels name a query of {folder / 'queries.jsonl'}")
    for what, count in (("queries not in queries.jsonl (left out)", issues["unknown_query_qrels"]),
                        ("documents not in corpus.jsonl (kept: they count as misses)", issues["unknown_document_qrels"])):
        if count:
            log.warning("%s/%s: %d qrels rows name %s", folder.name, split, count, what)

    rng = np.random.default_rng(seed)
    qids = list(qrels)
    if max_queries is not None and max_queries < len(qids):
        qids = [qids[i] for i in np.sort(rng.choice(len(qids), max_queries, replace=False))]
        qrels = {q: qrels[q] for q in qids}
    doc_ids = list(doc_text)
    if max_corpus is not None and max_corpus < len(doc_ids):
        judged = {d for rel in qrels.values() for d in rel if d in doc_text}
        others = [d for d in doc_ids if d not in judged]
        extra = max(max_corpus - len(judged), 0)
        keep = judged | {others[i] for i in rng.choice(len(others), min(extra, len(others)), replace=False)}
        doc_ids = [d for d in doc_ids if d in keep]
    return RetrievalData(name or folder.name, split, doc_ids, [doc_text[d] for d in doc_ids], qids,
                         [query_text[q] for q in qids], qrels, issues)


def beir_dataset(data_cfg: DataConfig, name: str, split: str, max_corpus: int | None = None,
                 max_queries: int | None = None, seed: int = 0) -> RetrievalData:
    """The BEIR dataset a config names: a data path resolved like every other (data root, Hugging Face cache,
    Hub), named in results as the config writes it."""
    return load_beir(data_cfg.resolve_path(name), split, max_corpus, max_queries, seed, name=PurePosixPath(name).name)


def load_sts(folder: Path, split: str = "test", name: str | None = None) -> STSData:
    """STS Benchmark pairs with 0-5 scores, in either layout: the release files (`sts-<split>.csv`, tab-separated,
    score in column 5, sentences in 6-7, read without CSV quoting as the release intends: sentences contain quote
    characters) or the Hugging Face dataset's (`<split>.jsonl.gz` with sentence1, sentence2, score; the
    release's `dev` is its `validation`). `name` (default: the folder's) is what results call the dataset."""
    folder = Path(folder)
    path = folder / f"sts-{split}.csv"
    hub_path = folder / f"{ {'dev': 'validation'}.get(split, split)}.jsonl.gz"
    if path.is_file():
        s1, s2, scores = _sts_release_rows(path)
    elif hub_path.is_file():
        s1, s2, scores = _sts_jsonl_rows(hub_path)
    else:
        found = sorted(p.name for p in [*folder.glob("sts-*.csv"), *folder.glob("*.jsonl.gz")])
        raise EvaluationError(f"{folder}: no STS file for split {split!r} ({path.name} or {hub_path.name} "
                              f"missing; found {found})")
    if not scores:
        raise EvaluationError(f"{path if path.is_file() else hub_path}: no sentence pairs")
    return STSData(name or folder.name, split, s1, s2, scores)


def _sts_score(raw, where: str) -> float:
    try:
        score = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"{where}: score {raw!r} is not a number") from None
    if not 0 <= score <= 5:
        raise DataError(f"{where}: score {score} outside the 0-5 range")
    return score


def _sts_release_rows(path: Path) -> tuple[list[str], list[str], list[float]]:
    s1, s2, scores = [], [], []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 7:
                raise DataError(f"{path}:{lineno}: expected at least 7 tab-separated columns, got {len(parts)}")
            scores.append(_sts_score(parts[4], f"{path}:{lineno}"))
            s1.append(parts[5])
            s2.append(parts[6])
    return s1, s2, scores


def _sts_jsonl_rows(path: Path) -> tuple[list[str], list[str], list[float]]:
    s1, s2, scores = [], [], []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            for key in ("sentence1", "sentence2"):
                if not isinstance(row.get(key) if isinstance(row, dict) else None, str):
                    raise DataError(f"{path}:{lineno}: field '{key}' missing or not a string")
            scores.append(_sts_score(row.get("score"), f"{path}:{lineno}"))
            s1.append(row["sentence1"])
            s2.append(row["sentence2"])
    return s1, s2, scores


# ---------------------------------------------------------------------------------------------- mteb tasks


def _task_metadata(task_type: str, name: str, split: str, main_score: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=f"Local{task_type}_{name}", type=task_type, main_score=main_score, description=f"local {name} files",
        dataset={"path": f"local/{name}", "revision": "local"}, reference=None, category="t2t",
        modalities=["text"], eval_splits=[split], eval_langs=["eng-Latn"], date=None, dialect=None, domains=None,
        task_subtypes=None, license=None, annotations_creators=None, sample_creation=None, bibtex_citation=None,
    )


def retrieval_task(data: RetrievalData):
    """An mteb retrieval task over `data` (loaded in memory; never touches the Hub)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _task_metadata("Retrieval", data.name, data.split, "ndcg_at_10")
        k_values = RETRIEVAL_K  # the run holds the top max(k) documents: 100, not mteb's 1000, is what we report

        def load_data(self, num_proc=None, **kwargs) -> None:
            corpus = Dataset.from_dict({"id": data.corpus_ids, "text": data.corpus_texts,
                                        "title": [""] * len(data.corpus_ids)})
            queries = Dataset.from_dict({"id": data.query_ids, "text": data.query_texts})
            split = {"corpus": corpus, "queries": queries, "relevant_docs": data.qrels, "top_ranked": None}
            self.dataset = {"default": {data.split: split}}
            self.data_loaded = True

        def task_specific_scores(self, scores, qrels, results, hf_split, hf_subset) -> dict[str, float]:
            """mteb's per-query pytrec_eval scores averaged at full precision (they override its rounded means)."""
            exact: dict[str, float] = {}
            for measure in next(iter(scores.values()), {}):
                prefix, _, k = measure.rpartition("_")
                if prefix in _PYTREC_KEYS:
                    exact[f"{_PYTREC_KEYS[prefix]}_{k}"] = float(np.mean([s[measure] for s in scores.values()]))
            return exact

    return LocalRetrieval()


def sts_task(data: STSData):
    """An mteb STS task over `data`. Sentence1 is marked the query side and sentence2 the document side only
    so a served model can answer each from its own encoder (asymmetric mode); no prompt is involved."""
    from datasets import Dataset
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.types import PromptType

    class LocalSTS(AbsTaskSTS):
        metadata = _task_metadata("STS", data.name, data.split, "cosine_spearman")
        input1_prompt_type = PromptType.query
        input2_prompt_type = PromptType.document

        def load_data(self, num_proc=None, **kwargs) -> None:
            pairs = Dataset.from_dict({"sentence1": data.sentence1, "sentence2": data.sentence2,
                                       "score": data.scores})
            self.dataset = {"default": {data.split: pairs}}
            self.data_loaded = True

    return LocalSTS()


# ---------------------------------------------------------------------------------------------- served models


def _model_meta(name: str, dim: int):
    from mteb.models.model_meta import ModelMeta

    return ModelMeta.create_empty({"name": f"leaf-ray/{name}", "revision": "local", "embed_dim": dim,
                                   "similarity_fn_name": "dot"})


def rank(queries: np.ndarray, documents: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-k document indices and scores per query by dot product, best first (ties: earlier document)."""
    k = min(k, len(documents))
    idx = np.empty((len(queries), k), dtype=np.int64)
    top = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ documents.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        idx[start:start + block] = order
        top[start:start + block] = np.take_along_axis(scores, order, axis=1)
    return idx, top


class ServedSearch:
    """mteb SearchProtocol over precomputed vectors: it ranks, mteb scores. Keeps the run it returned."""

    def __init__(self, name: str, query_ids: list[str], queries: np.ndarray, doc_ids: list[str],
                 documents: np.ndarray):
        self.mteb_model_meta = _model_meta(name, queries.shape[1])
        self._query_row = {q: i for i, q in enumerate(query_ids)}
        self._queries, self._doc_ids, self._documents = queries, doc_ids, documents
        self.ranking: dict[str, list[str]] = {}  # query id -> ranked document ids
        self.run: dict[str, dict[str, float]] = {}  # the same with scores, as handed to mteb (pytrec_eval run)

    def index(self, corpus, **kwargs) -> None:
        if list(corpus["id"]) != self._doc_ids:
            raise EvaluationError("mteb's corpus differs from the one the vectors were computed for")

    def search(self, queries, *, top_k: int, **kwargs) -> dict[str, dict[str, float]]:
        qids = list(queries["id"])
        idx, scores = rank(self._queries[[self._query_row[q] for q in qids]], self._documents, top_k)
        self.ranking = {q: [self._doc_ids[j] for j in row] for q, row in zip(qids, idx)}
        self.run = {q: dict(zip(self.ranking[q], map(float, row))) for q, row in zip(qids, scores)}
        return self.run


class ServedEncoder:
    """mteb EncoderProtocol over precomputed vectors, looked up by text per side ("query" / "document")."""

    def __init__(self, name: str, sides: Mapping[str, Mapping[str, np.ndarray]], dim: int):
        self.mteb_model_meta = _model_meta(name, dim)
        self._sides = sides

    def encode(self, inputs, *, prompt_type=None, **kwargs) -> np.ndarray:
        table = self._sides[prompt_type.value if prompt_type is not None else "query"]
        return np.stack([table[text] for batch in inputs for text in batch["text"]])

    def similarity(self, a, b):
        import torch

        return torch.as_tensor(np.asarray(a) @ np.asarray(b).T)

    def similarity_pairwise(self, a, b):
        import torch

        return torch.as_tensor((np.asarray(a) * np.asarray(b)).sum(axis=1))


def _mteb_scores(model, task, split: str) -> dict[str, Any]:
    import mteb

    result = mteb.evaluate(model, task, cache=None, co2_tracker=False, show_progress_bar=False,
                           encode_kwargs={"batch_size": 512, "show_progress_bar": False})
    return result.task_results[0].scores[split][0]


def run_retrieval(task, data: RetrievalData, name: str, queries: np.ndarray,
                  documents: np.ndarray) -> tuple[dict[str, Any], ServedSearch]:
    """mteb's scores (full-precision means) for one pair of derived query/document matrices on a retrieval
    task, and the served model, which holds the ranking mteb scored."""
    served = ServedSearch(name, data.query_ids, queries, data.corpus_ids, documents)
    return _mteb_scores(served, task, data.split), served


# ---------------------------------------------------------------------------------------------- variants


def truncate(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Matryoshka: keep the first `dims` coordinates and renormalise (zero vectors stay zero)."""
    if not 0 < dims <= vectors.shape[1]:
        raise EvaluationError(f"cannot truncate {vectors.shape[1]}-d vectors to {dims} dims")
    cut = vectors[:, :dims]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.where(norms > 0, norms, 1)).astype(np.float32)


def bytes_per_vector(dims: int, quantization: str) -> int:
    return math.ceil(dims * QUANTIZATION_BITS[quantization] / 8)


@dataclass(frozen=True)
class Quantizer:
    """Maps vectors to what a quantized index compares, as float32 whose dot product is the quantized score:
    int8 -> dequantized levels (per-dimension ranges fit on the document side), binary -> +-1."""

    kind: str
    low: np.ndarray | None = None
    step: np.ndarray | None = None

    @classmethod
    def fit(cls, kind: str, documents: np.ndarray) -> Quantizer:
        if kind not in QUANTIZATION_BITS:
            raise EvaluationError(f"unknown quantization {kind!r} (known: {sorted(QUANTIZATION_BITS)})")
        if kind != "int8":
            return cls(kind)
        low, high = documents.min(axis=0), documents.max(axis=0)
        return cls(kind, low, np.maximum(high - low, 1e-12) / 255)

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """The stored form: int8 levels, or packed sign bits (dims/8 bytes)."""
        if self.kind == "int8":
            return (np.clip(np.rint((vectors - self.low) / self.step), 0, 255) - 128).astype(np.int8)
        if self.kind == "binary":
            return np.packbits(vectors > 0, axis=1)
        return vectors.astype(np.float32)

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        if self.kind == "int8":
            return (self.low + (self.codes(vectors).astype(np.float32) + 128) * self.step).astype(np.float32)
        if self.kind == "binary":
            return np.where(vectors > 0, 1.0, -1.0).astype(np.float32)
        return vectors.astype(np.float32)


def derive(queries: np.ndarray, documents: np.ndarray, dims: int, quantization: str) -> tuple[np.ndarray, np.ndarray]:
    """One variant of a (query-side, document-side) pair: truncate + renormalise, then quantize both sides
    with the ranges of the document side."""
    q, d = truncate(queries, dims), truncate(documents, dims)
    quantizer = Quantizer.fit(quantization, d)
    return quantizer(q), quantizer(d)


def variants(full_dim: int, dims: Sequence[int], quantizations: Sequence[str]) -> list[tuple[int, str]]:
    """(dims, quantization) pairs: the full dimension first, then the requested Matryoshka dims, largest first."""
    bad = [d for d in dims if not 0 < d <= full_dim]
    if bad:
        raise EvaluationError(f"Matryoshka dims {bad} are not in 1..{full_dim} (the encoders' dimension)")
    unknown = [q for q in quantizations if q not in QUANTIZATION_BITS]
    if unknown or not quantizations:
        raise EvaluationError(f"quantizations {list(quantizations)}: each must be one of {list(QUANTIZATION_BITS)}")
    all_dims = sorted({full_dim, *dims}, reverse=True)
    return [(d, q) for d in all_dims for q in dict.fromkeys(quantizations)]


# ---------------------------------------------------------------------------------------------- agreement


def overlap_at_k(ranking: Mapping[str, Sequence[str]], reference: Mapping[str, Sequence[str]],
                 k: int = OVERLAP_K) -> float:
    """Mean over queries of |top-k ∩ reference top-k| / k (k capped at what the reference ranked)."""
    return float(np.mean([len(set(ranking[q][:k]) & set(ref[:k])) / len(ref[:k]) for q, ref in reference.items()]))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine between two encoders' vectors of the same texts."""
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.where(den > 0, den, 1)))


# ---------------------------------------------------------------------------------------------- encoding


def _normalised(vectors: np.ndarray, rows: int, name: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != rows:
        raise EvaluationError(f"encoder {name!r} returned shape {vectors.shape} for {rows} texts")
    if not np.isfinite(vectors).all():
        raise EvaluationError(f"encoder {name!r} returned NaN/Inf vectors")
    return truncate(vectors, vectors.shape[1])


def encode_once(sources: Mapping[str, VectorSource], texts: list[str], ids: list[str], kind: str,
                timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """L2-normalised vectors of `texts` from every named source. A source object registered under several
    names (the teacher standing in as its own student) is run once; every variant is derived from these."""
    done: dict[int, np.ndarray] = {}
    out = {}
    for name, source in sources.items():
        if id(source) not in done:
            started = time.perf_counter()
            done[id(source)] = _normalised(source(texts, ids, kind), len(texts), name)
            if timings is not None:
                timings[f"encode_{name}_{kind}_s"] = round(time.perf_counter() - started, 2)
        out[name] = done[id(source)]
    return out


def sentence_transformer_source(model, prompts: Mapping[str, str], batch_size: int = 64,
                                progress: bool = True) -> VectorSource:
    """Encode directly with a loaded SentenceTransformer, prompting each kind as given."""

    def encode(texts: list[str], ids: list[str], kind: str) -> np.ndarray:
        return model.encode(texts, prompt=prompts.get(kind) or None, batch_size=batch_size,
                            normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress)

    return encode


def teacher_cache_source(teacher: TeacherConfig, cache_root, allow_hub: bool = False,
                         model_root: Path | None = None) -> VectorSource:
    """The teacher's vectors through the project's parquet cache (Ray Data stage): every student of a teacher
    is evaluated against the same cached teacher document vectors, and only the first evaluation pays.
    `cache_root` and `model_root` as for leaf_ray.teacher.build_cache (the cache may be in a bucket)."""
    import pyarrow as pa

    from leaf_ray.teacher import teacher_embeddings

    def encode(texts: list[str], ids: list[str], kind: str) -> np.ndarray:
        table = pa.table({"id": ids, "text": texts, "kind": [kind] * len(texts)})
        return teacher_embeddings(table, teacher, cache_root, allow_hub, model_root)

    return encode


def load_manifest(student_dir: Path) -> dict | None:
    """The student's leaf_manifest.json, checked for what evaluation needs; None for a plain model."""
    from leaf_ray.student import MANIFEST_NAME, read_manifest

    path = Path(student_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(student_dir)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest.get("teacher"), dict) or not manifest["teacher"].get("model"):
        raise EvaluationError(f"{path}: needs a 'teacher' object with at least 'model'")
    return manifest


def resolve_teacher(student_dir: Path | None, teacher: str | None, base: TeacherConfig) -> TeacherConfig:
    """The teacher to compare with: `teacher` if given, else the student manifest's. The manifest's settings
    (prompts, max_length, ...) apply when it names that same teacher; otherwise `base`'s do."""
    manifest = load_manifest(student_dir) if student_dir is not None and Path(student_dir).is_dir() else None
    if teacher is None and manifest is None:
        raise EvaluationError(f"{student_dir}: no leaf_manifest.json names the teacher; pass the teacher explicitly")
    if manifest is not None and teacher in (None, manifest["teacher"]["model"]):
        known = {k: v for k, v in manifest["teacher"].items() if k in TeacherConfig.model_fields}
        return TeacherConfig.model_validate(base.model_dump() | known)
    return base.model_copy(update={"model": teacher})


def student_prompts(model, teacher: TeacherConfig) -> dict[str, str]:
    """The student's own `query` / `document` prompts (sentence-transformers `prompts`) when it carries them,
    else the teacher's: a LEAF student learns from the same prompted texts the teacher embedded."""
    own = getattr(model, "prompts", None) or {}
    return {kind: own.get(kind, teacher.prompt_for(kind)) for kind in ("query", "document")}


def build_sources(student: str, teacher: TeacherConfig, cache_root: Path, batch_size: int = 64,
                  allow_hub: bool = False, teacher_cache=None) -> dict[str, VectorSource]:
    """Teacher (through the teacher cache) and student (encoded directly). A student that is the teacher's own
    model with the same prompts shares the teacher's source, so its texts are not encoded twice.
    `cache_root` is the local model directory; `teacher_cache` the teacher-cache root (a local path, URI or
    leaf_ray.storage.StoragePath), by default `cache_root`."""
    from leaf_ray.models import load_sentence_transformer, resolve_model

    model = load_sentence_transformer(student, cache_root, allow_hub=allow_hub)
    prompts = student_prompts(model, teacher)
    teacher_source = teacher_cache_source(teacher, cache_root if teacher_cache is None else teacher_cache,
                                          allow_hub, model_root=cache_root)
    same_model = resolve_model(student, cache_root, allow_hub) == resolve_model(teacher.model, cache_root, allow_hub)
    if same_model and prompts == {k: teacher.prompt_for(k) for k in prompts}:
        log.info("student %s is the teacher's model with the teacher's prompts: sharing its vectors", student)
        return {"teacher": teacher_source, "student": teacher_source}
    return {"teacher": teacher_source, "student": sentence_transformer_source(model, prompts, batch_size)}


# ---------------------------------------------------------------------------------------------- evaluation


def _record(data, task: str, mode: str, dims: int, quantization: str, metric: str, value: float) -> dict:
    return {"dataset": data.name, "split": data.split, "task": task, "mode": mode, "dims": dims,
            "quantization": quantization, "bytes_per_vector": bytes_per_vector(dims, quantization),
            "metric": metric, "value": float(value)}


def _modes_for(sources: Mapping[str, VectorSource], modes: Mapping[str, tuple[str, str]] | None):
    """The requested modes, or every mode of MODES whose encoders are all given (a teacher alone: 'teacher')."""
    if modes is None:
        modes = {m: pair for m, pair in MODES.items() if set(pair) <= set(sources)}
    missing = {m: pair for m, pair in modes.items() if not set(pair) <= set(sources)}
    if missing or not modes:
        raise EvaluationError(f"modes {missing or '(none)'} need encoders {sorted(sources)} do not provide")
    return dict(modes)


def _full_dim(vectors: Mapping[str, np.ndarray]) -> int:
    """The one dimension all encoders share (a LEAF student embeds in its teacher's space)."""
    found = {name: v.shape[1] for name, v in vectors.items()}
    if len(set(found.values())) != 1:
        raise EvaluationError(f"encoders disagree on the dimension {found}: a student must embed in its teacher's "
                              "space (project it to the teacher's dimension)")
    return next(iter(found.values()))


def evaluate_retrieval(data: RetrievalData, sources: Mapping[str, VectorSource], dims: Sequence[int] = (),
                       quantizations: Sequence[str] = ("float32",), modes: Mapping[str, tuple[str, str]] | None = None,
                       timings: dict[str, float] | None = None, progress: bool = True) -> list[dict]:
    """Metric records for every (mode, dims, quantization) on one retrieval split, plus agreement with the
    teacher: overlap@10 against the teacher's ranking at the same variant, mean cosine at each dims."""
    modes = _modes_for(sources, modes)
    queries = encode_once(sources, data.query_texts, data.query_ids, "query", timings)
    documents = encode_once(sources, data.corpus_texts, data.corpus_ids, "document", timings)
    full = _full_dim(documents)
    task = retrieval_task(data)
    task.load_data()
    records = []
    steps = variants(full, dims, quantizations)
    for dim, quant in tqdm(steps, desc=f"{data.name} retrieval variants", disable=not progress):
        reference = None
        for mode, (q_enc, d_enc) in sorted(modes.items(), key=lambda m: m[0] != "teacher"):
            q, d = derive(queries[q_enc], documents[d_enc], dim, quant)
            scores, served = run_retrieval(task, data, f"{data.name}-{mode}-{dim}d-{quant}", q, d)
            records += [_record(data, "retrieval", mode, dim, quant, m, scores[m]) for m in RETRIEVAL_METRICS]
            if mode == "teacher":
                reference = served.ranking
            elif reference is not None:
                records.append(_record(data, "retrieval", mode, dim, quant, f"overlap_at_{OVERLAP_K}",
                                       overlap_at_k(served.ranking, reference)))
    if "teacher" in sources:
        for name in (n for n in dict.fromkeys(e for pair in modes.values() for e in pair) if n != "teacher"):
            for dim in sorted({d for d, _ in steps}, reverse=True):
                for side, vecs in (("queries", queries), ("documents", documents)):
                    cos = mean_cosine(truncate(vecs[name], dim), truncate(vecs["teacher"], dim))
                    records.append(_record(data, "retrieval", name, dim, "float32", f"cosine_to_teacher_{side}", cos))
    return records


def evaluate_sts(data: STSData, sources: Mapping[str, VectorSource], dims: Sequence[int] = (),
                 quantizations: Sequence[str] = ("float32",), modes: Mapping[str, tuple[str, str]] | None = None,
                 kind: str = "document", timings: dict[str, float] | None = None, progress: bool = True) -> list[dict]:
    """STS correlations per (mode, dims, quantization); asymmetric mode scores student sentence1 vectors
    against teacher sentence2 vectors. int8 ranges are fit on the document-side encoder's vectors of all
    sentences."""
    modes = _modes_for(sources, modes)
    texts = list(dict.fromkeys(data.sentence1 + data.sentence2))
    vectors = encode_once(sources, texts, [f"{data.name}:{i}" for i in range(len(texts))], kind, timings)
    full = _full_dim(vectors)
    task = sts_task(data)
    task.load_data()
    records = []
    for dim, quant in tqdm(variants(full, dims, quantizations), desc=f"{data.name} STS variants",
                           disable=not progress):
        for mode, (q_enc, d_enc) in modes.items():
            q, d = derive(vectors[q_enc], vectors[d_enc], dim, quant)
            served = ServedEncoder(f"{data.name}-{mode}-{dim}d-{quant}",
                                   {"query": dict(zip(texts, q)), "document": dict(zip(texts, d))}, dim)
            scores = _mteb_scores(served, task, data.split)
            records += [_record(data, "sts", mode, dim, quant, m, scores[m]) for m in STS_METRICS]
    return records


@dataclass
class EvaluationResult:
    records: list[dict]  # one per metric: dataset, split, task, mode, dims, quantization, bytes_per_vector, value
    datasets: list[dict]  # what was read, with every data issue counted
    timings: dict[str, float]

    def notes(self) -> list[str]:
        """Human-readable data issues, for the report."""
        notes = []
        for summary in self.datasets:
            for key in ("unknown_query_qrels", "unknown_document_qrels"):
                if summary.get(key):
                    what = "unknown queries (left out)" if "query" in key else "unknown documents (kept as misses)"
                    notes.append(f"{summary['dataset']}/{summary['split']}: {summary[key]} qrels rows name {what}")
        return notes


def run_evaluation(cfg: EvalConfig, sources: Mapping[str, VectorSource], data_cfg: DataConfig,
                   progress: bool = True) -> EvaluationResult:
    """Every configured BEIR dataset (and the STS folder, if set) for every mode the sources allow."""
    if not cfg.datasets and not cfg.sts:
        raise EvaluationError("evaluate.datasets is empty and evaluate.sts is unset: nothing to evaluate")
    records, summaries, timings = [], [], {}
    for name in cfg.datasets:
        started = time.perf_counter()
        data = beir_dataset(data_cfg, name, cfg.split, cfg.max_corpus, cfg.max_queries, cfg.seed)
        summaries.append(data.summary())
        steps: dict[str, float] = {}
        records += evaluate_retrieval(data, sources, cfg.dims, cfg.quantizations, timings=steps, progress=progress)
        timings |= {f"{data.name}_{k}": v for k, v in steps.items()}
        timings[f"{data.name}_total_s"] = round(time.perf_counter() - started, 2)
    if cfg.sts:
        started = time.perf_counter()
        data = load_sts(data_cfg.resolve_path(cfg.sts), cfg.split, name=PurePosixPath(cfg.sts).name)
        summaries.append(data.summary())
        steps = {}
        records += evaluate_sts(data, sources, cfg.dims, cfg.quantizations, kind=cfg.sts_kind, timings=steps,
                                progress=progress)
        timings |= {f"{data.name}_{k}": v for k, v in steps.items()}
        timings[f"{data.name}_total_s"] = round(time.perf_counter() - started, 2)
    return EvaluationResult(records, summaries, timings)
