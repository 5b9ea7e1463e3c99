"""The Pareto front over validation quality, speed and bytes per vector: the teacher and the evaluated students
timed side by side, one point per (student, dims, quantization), the front, and the export of the students on
it with their evaluation on `evaluate.split` (the only step of a sweep that scores the test split)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from leaf_ray.config import RunConfig
from leaf_ray.evaluate import bytes_per_vector
from leaf_ray.report import headline
from leaf_ray.sweep.space import FRONT_DIR, sweep_dir
from leaf_ray.sweep.validation import QUALITY_METRIC, mean_metric

if TYPE_CHECKING:  # annotations only: the job passes its run in
    from leaf_ray.recipe import LeafRun

SPEED_ROUNDS = 3  # timing rounds per encoder (best kept): short samples on a shared machine are noisy


def measure_speed(run: LeafRun, rows: Sequence[dict]) -> dict[str, dict]:
    """docs/s, queries/s and batch-1 latency of the teacher and every evaluated student, on
    `evaluate.throughput_samples` validation texts, timed side by side in one call after the tuner (concurrent
    trials would time each other's load)."""
    students = {row["trial_id"]: row["student_path"] for row in rows if row["status"] == "evaluated"}
    return run.throughput(students, split=run.cfg.sweep.validation_split, rounds=SPEED_ROUNDS,
                          latency_queries=16)


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


def export_front(run: LeafRun, rows: Sequence[dict], points: Sequence[dict], front: Sequence[int],
                 speed: Mapping[str, dict]) -> dict[str, list[dict]]:
    """Export each student with a point in `front` (the Pareto front's indices into `points`, or all of them with
    sweep.test_scores: all) like any run (`pareto/<trial>/student` + its manifest, and the results.json /
    results.md / plots of its evaluation on `evaluate.split`); returns the test records per trial id."""
    cfg, by_id, tested = run.cfg, {row["trial_id"]: row for row in rows}, {}
    for trial_id in dict.fromkeys(points[i]["trial_id"] for i in front):
        row, out = by_id[trial_id], sweep_dir(cfg) / FRONT_DIR / trial_id
        shutil.copytree(row["student_path"], out / "student", dirs_exist_ok=True)
        evaluation = run.evaluate(out / "student", progress=False)
        summary = {"sweep": cfg.name, "trial": trial_id, "label": row["label"], "params": row["params"],
                   "param_counts": row["param_counts"], "train": row["train"], "throughput": speed[trial_id],
                   "validation": headline(row["records"]), "headline": headline(evaluation.records)}
        title = f"Sweep {cfg.name}, trial {row['label']}: {cfg.teacher.model} -> leaf"
        run.export(out / "student", out, evaluation, title, summary)
        tested[trial_id] = evaluation.records
    return tested
