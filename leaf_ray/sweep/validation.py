"""What trials are scored by: retrieval records on `sweep.validation_split` (never the split the final report
scores), the teacher's own validation scores, and the means read from records. Shared by the trials, the
driver and the report, and free of Ray imports so the driver's side of the package stays light."""

from __future__ import annotations

from collections.abc import Sequence

from leaf_ray.config import RunConfig
from leaf_ray.evaluate import MODES, TeacherCacheSource, beir_dataset, evaluate_retrieval, prefetch

ALIGNMENT = "val_cosine"  # what ASHA ranks trials by (leaf_ray.train reports it)
TRIAL_MODES = {mode: MODES[mode] for mode in ("student", "asymmetric")}
QUALITY_METRIC = "ndcg_at_10"


def validation_records(cfg: RunConfig, sources, modes) -> list[dict]:
    """Retrieval records on `sweep.validation_split` of every evaluate.datasets entry (never the test split),
    at every dims x quantization of the evaluate section."""
    sweep, ev = cfg.sweep, cfg.evaluate
    datasets = [beir_dataset(cfg.data, name, sweep.validation_split, sweep.validation_max_corpus,
                             sweep.validation_max_queries, ev.seed) for name in ev.datasets]
    prefetch(sources, [r for data in datasets for r in data.requests()])
    return [record for data in datasets
            for record in evaluate_retrieval(data, sources, ev.dims, ev.quantizations, modes=modes, progress=False)]


def teacher_validation(cfg: RunConfig) -> list[dict]:
    """The teacher's own validation scores (the report's reference). Run by the driver before the tuner, it
    also caches the teacher's vectors of the validation texts, which every trial then only reads."""
    teacher = TeacherCacheSource(cfg.teacher, cfg.storage.cache_location(), cfg.model_store())
    return validation_records(cfg, {"teacher": teacher}, {"teacher": MODES["teacher"]})


def mean_metric(records: Sequence[dict], mode: str, metric: str, dims=None, quantization="float32"):
    """Mean of `metric` over datasets at (dims, quantization), by default the full dims in float32; None if absent."""
    chosen = [r for r in records if (r["mode"], r["metric"], r["quantization"]) == (mode, metric, quantization)]
    dims = dims or max((r["dims"] for r in chosen), default=None)
    values = [r["value"] for r in chosen if r["dims"] == dims]
    return sum(values) / len(values) if values else None
