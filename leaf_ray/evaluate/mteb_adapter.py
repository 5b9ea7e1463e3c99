"""mteb on local data and precomputed vectors: the tasks and the models that serve the vectors to them.

mteb's own tasks download from the Hub, so the tasks here are AbsTaskRetrieval / AbsTaskSTS subclasses whose
`load_data` serves local files (any BEIR folder; the STS Benchmark folder). Each variant's vectors reach
`mteb.evaluate` as a model that serves them: for retrieval a SearchProtocol (it ranks by dot product, mteb
scores the run with pytrec_eval), for STS an EncoderProtocol (mteb computes the correlations). So mteb never
re-encodes, and the ranking mteb scores is the one the agreement metrics (overlap@10) use. Every variant gets a
unique model name and `cache=None`, so results never mix. mteb rounds its retrieval means to 5 decimals; the
retrieval task reports the same per-query pytrec_eval scores averaged at full precision instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from leaf_ray.evaluate.data import EvaluationError, RetrievalData, STSData

RETRIEVAL_K = (1, 3, 5, 10, 100)
# pytrec_eval measure -> mteb score key prefix (mteb's `make_score_dict` naming).
_PYTREC_KEYS = {"ndcg_cut": "ndcg_at", "map_cut": "map_at", "recall": "recall_at", "P": "precision_at",
                "success": "hit_rate_at"}


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


def mteb_scores(model, task, split: str) -> dict[str, Any]:
    """The scores mteb computes for a served model on one split of a task."""
    import mteb

    result = mteb.evaluate(model, task, cache=None, co2_tracker=False, show_progress_bar=False,
                           encode_kwargs={"batch_size": 512, "show_progress_bar": False})
    return result.task_results[0].scores[split][0]


def run_retrieval(task, data: RetrievalData, name: str, queries: np.ndarray,
                  documents: np.ndarray) -> tuple[dict[str, Any], ServedSearch]:
    """mteb's scores (full-precision means) for one pair of derived query/document matrices on a retrieval
    task, and the served model, which holds the ranking mteb scored."""
    served = ServedSearch(name, data.query_ids, queries, data.corpus_ids, documents)
    return mteb_scores(served, task, data.split), served
