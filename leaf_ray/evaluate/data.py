"""The local evaluation data: BEIR retrieval folders and STS Benchmark pairs, read and checked here so every
oddity is counted or refused with a message before any encoder runs. `EvaluationError` lives here, at the
bottom of the package, because every other evaluate module raises it too.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from leaf_ray.config import DataConfig
from leaf_ray.data import DataError, read_beir_corpus, read_jsonl
from leaf_ray.errors import LeafRayError

log = logging.getLogger(__name__)


class EvaluationError(LeafRayError, ValueError):
    """Evaluation inputs that cannot give meaningful numbers; the message says which and why."""


# What an encoder is asked for: (texts, ids, kind). Ids are namespaced by dataset, so that (kind, id) names one
# text across all the datasets of an evaluation and a cache can serve them all from one pass.
EncodeRequest = tuple[list[str], list[str], str]


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

    def requests(self) -> tuple[EncodeRequest, EncodeRequest]:
        """What the queries' and the documents' encoders are asked for."""
        return ((self.query_texts, [f"{self.name}:{i}" for i in self.query_ids], "query"),
                (self.corpus_texts, [f"{self.name}:{i}" for i in self.corpus_ids], "document"))


@dataclass
class STSData:
    name: str
    split: str
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split, "task": "sts", "pairs": len(self.scores)}

    def request(self, kind: str) -> EncodeRequest:
        """Every distinct sentence of either side, encoded as `kind`."""
        texts = list(dict.fromkeys(self.sentence1 + self.sentence2))
        return texts, [f"{self.name}:{i}" for i in range(len(texts))], kind


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
