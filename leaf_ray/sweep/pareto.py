"""The Pareto front over validation quality, speed and bytes per vector: the teacher and the evaluated students
timed side by side, one point per (student, dims, quantization), the front, and the export of the students on
it with their evaluation on `evaluate.split` (the only step of a sweep that scores the test split)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence

from leaf_ray.config import RunConfig
from leaf_ray.evaluate import beir_dataset, build_sources, bytes_per_vector, run_evaluation, student_prompts
from leaf_ray.report import headline, write_report
from leaf_ray.sweep.space import FRONT_DIR, sweep_dir
from leaf_ray.sweep.validation import QUALITY_METRIC, mean_metric

SPEED_ROUNDS = 3  # timing rounds per encoder (best kept): short samples on a shared machine are noisy


def measure_speed(cfg: RunConfig, rows: Sequence[dict]) -> dict[str, dict]:
    """docs/s, queries/s and batch-1 latency of the teacher and every evaluated student, on
    `evaluate.throughput_samples` validation texts, timed side by side in one call after the tuner (concurrent
    trials would time each other's load)."""
    from leaf_ray.bench import measure_encoders
    from leaf_ray.models import load_sentence_transformer
    from leaf_ray.student import teacher_prompts

    n = cfg.evaluate.throughput_samples
    sample = beir_dataset(cfg.data, cfg.evaluate.datasets[0], cfg.sweep.validation_split, max_corpus=n,
                          max_queries=n, seed=cfg.evaluate.seed)
    encoders = {"teacher": load_sentence_transformer(cfg.teacher.model, cfg.storage.local_cache_path(),
                                                     max_length=cfg.teacher.max_length, allow_hub=cfg.allow_hub)}
    prompts = {"teacher": teacher_prompts(cfg.teacher)}
    for row in rows:
        if row["status"] == "evaluated":
            encoders[row["trial_id"]] = load_sentence_transformer(row["student_path"])
            prompts[row["trial_id"]] = student_prompts(encoders[row["trial_id"]], cfg.teacher)
    return measure_encoders(encoders, sample.query_texts, sample.corpus_texts[:n], prompts, rounds=SPEED_ROUNDS,
                            latency_queries=min(16, n))


def pareto_front(points: Sequence[Mapping[str, float]], maximize: Sequence[str] = (),
                 minimize: Sequence[str] = ()) -> list[int]:
    """Indices, in order, of the points no other point dominates (at least as good on every axis and better
    on one). Equal points do not dominate each other: both stay on the front."""

    def dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
        no_worse = all(a[k] >= b[k] for k in maximize) and all(a[k] <= b[k] for k in minimize)
        better = any(a[k] > b[k] for k in maximize) or any(a[k] < b[k] for k in minimize)
        return no_worse and better

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def sweep_points(cfg: RunConfig, rows: Sequence[dict], speed: Mapping[str, dict]) -> list[dict]:
    """One point per (evaluated trial, dims, quantization): validation nDCG@10 in `sweep.quality_mode`, the
    student's `sweep.speed_metric`, bytes per vector."""
    points = []
    for row in (r for r in rows if r["status"] == "evaluated"):
        variants = dict.fromkeys((r["dims"], r["quantization"]) for r in row["records"] if r["metric"] == QUALITY_METRIC)
        for dims, quantization in variants:
            points.append({"trial_id": row["trial_id"], "label": row["label"], "dims": dims,
                           "quantization": quantization, "bytes_per_vector": bytes_per_vector(dims, quantization),
                           "quality": mean_metric(row["records"], cfg.sweep.quality_mode, QUALITY_METRIC, dims,
                                             quantization),
                           "speed": speed[row["trial_id"]][cfg.sweep.speed_metric]})
    return points


def front_of(points: Sequence[dict]) -> list[int]:
    return pareto_front(points, maximize=("quality", "speed"), minimize=("bytes_per_vector",))


def export_front(cfg: RunConfig, rows: Sequence[dict], points: Sequence[dict], front: Sequence[int],
                 speed: Mapping[str, dict]) -> dict[str, list[dict]]:
    """Export each student with a point on the front like any run (`pareto/<trial>/student` + its manifest,
    and the results.json / results.md / plots of its evaluation on `evaluate.split`); returns the test records
    per trial id."""
    from leaf_ray.student import update_manifest

    by_id, tested = {row["trial_id"]: row for row in rows}, {}
    for trial_id in dict.fromkeys(points[i]["trial_id"] for i in front):
        row, out = by_id[trial_id], sweep_dir(cfg) / FRONT_DIR / trial_id
        shutil.copytree(row["student_path"], out / "student", dirs_exist_ok=True)
        sources = build_sources(str(out / "student"), cfg.teacher, cfg.storage.local_cache_path(),
                                cfg.evaluate.batch_size, cfg.allow_hub, teacher_cache=cfg.storage.cache_location())
        evaluation = run_evaluation(cfg.evaluate, sources, cfg.data, progress=False)
        summary = {"sweep": cfg.name, "trial": trial_id, "label": row["label"], "params": row["params"],
                   "param_counts": row["param_counts"], "train": row["train"], "throughput": speed[trial_id],
                   "validation": headline(row["records"]), "headline": headline(evaluation.records)}
        update_manifest(out / "student", results=summary)
        write_report(out, evaluation.records, f"Sweep {cfg.name}, trial {row['label']}: {cfg.teacher.model} -> leaf",
                     summary, evaluation.notes(), plot_metrics=("ndcg_at_10", "cosine_spearman"))
        tested[trial_id] = evaluation.records
    return tested
