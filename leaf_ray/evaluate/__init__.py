"""Evaluation through mteb on local data: teacher, student and asymmetric mode (student queries, teacher
documents), each at Matryoshka dims and output quantizations, plus the student's agreement with the teacher.

Every encoder embeds a dataset's texts once (`sources`); each (mode, dims, quantization) variant is derived
from those vectors (`compression`) and scored by mteb through a model that serves them (`mteb_adapter`), on the
local BEIR / STS data (`data`), with agreement metrics on the side (`agreement`). This module runs that per
dataset and re-exports the names the jobs, benchmarks and tests use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from tqdm.auto import tqdm

from leaf_ray.config import DataConfig, EvalConfig
from leaf_ray.evaluate.agreement import OVERLAP_K, mean_cosine, overlap_at_k
from leaf_ray.evaluate.compression import Quantizer, bytes_per_vector, derive, truncate, variants
from leaf_ray.evaluate.data import EvaluationError, RetrievalData, STSData, beir_dataset, load_beir, load_sts
from leaf_ray.evaluate.mteb_adapter import ServedEncoder, mteb_scores, retrieval_task, run_retrieval, sts_task
from leaf_ray.evaluate.sources import (TeacherCacheSource, VectorSource, build_sources, encode_once, prefetch,
                                       resolve_teacher, student_prompts)

__all__ = ["MODES", "RETRIEVAL_METRICS", "STS_METRICS", "EvaluationError", "EvaluationResult", "Quantizer",
           "TeacherCacheSource", "beir_dataset", "build_sources", "bytes_per_vector", "derive", "encode_once",
           "evaluate_retrieval", "evaluate_sts", "load_beir", "load_sts", "mean_cosine", "overlap_at_k", "prefetch",
           "resolve_teacher", "retrieval_task", "run_evaluation", "run_retrieval", "student_prompts", "truncate",
           "variants"]

# mode -> (encoder of the queries, encoder of the documents); STS: sentence1 is the query side.
MODES: dict[str, tuple[str, str]] = {
    "teacher": ("teacher", "teacher"),
    "student": ("student", "student"),
    "asymmetric": ("student", "teacher"),
}
RETRIEVAL_METRICS = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "map_at_10")
STS_METRICS = ("cosine_spearman", "cosine_pearson")


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
    query_request, document_request = data.requests()
    queries = encode_once(sources, *query_request, timings)
    documents = encode_once(sources, *document_request, timings)
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
    request = data.request(kind)
    texts = request[0]
    vectors = encode_once(sources, *request, timings)
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
            scores = mteb_scores(served, task, data.split)
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
    """Every configured BEIR dataset (and the STS folder, if set) for every mode the sources allow. All data is
    read first, so the teacher encodes every dataset's texts in one stage."""
    if not cfg.datasets and not cfg.sts:
        raise EvaluationError("evaluate.datasets is empty and evaluate.sts is unset: nothing to evaluate")
    started = time.perf_counter()
    retrieval = [beir_dataset(data_cfg, name, cfg.split, cfg.max_corpus, cfg.max_queries, cfg.seed)
                 for name in cfg.datasets]
    sts = load_sts(data_cfg.resolve_path(cfg.sts), cfg.split, name=PurePosixPath(cfg.sts).name) if cfg.sts else None
    prefetch(sources, [r for data in retrieval for r in data.requests()] + ([sts.request(cfg.sts_kind)] if sts else []))
    timings = {"prefetch_s": round(time.perf_counter() - started, 2)}
    records, summaries = [], []
    for data in retrieval + ([sts] if sts else []):
        started, steps = time.perf_counter(), {}
        summaries.append(data.summary())
        if isinstance(data, RetrievalData):
            records += evaluate_retrieval(data, sources, cfg.dims, cfg.quantizations, timings=steps, progress=progress)
        else:
            records += evaluate_sts(data, sources, cfg.dims, cfg.quantizations, kind=cfg.sts_kind, timings=steps,
                                    progress=progress)
        timings |= {f"{data.name}_{k}": v for k, v in steps.items()}
        timings[f"{data.name}_total_s"] = round(time.perf_counter() - started, 2)
    return EvaluationResult(records, summaries, timings)
