"""Ray Tune sweeps over students, and the quality / speed / bytes-per-vector Pareto report.

Users want the smallest, fastest leaf that is good enough for their index budget. A sweep trains one student
per point of `sweep.students` x `sweep.grid`, evaluates each at every Matryoshka dims x quantization
(derived from one encoding: no retraining per variant), times them, and reports which (student, dims,
quantization) points no other point beats on quality, speed and bytes per vector at once.

How it runs on Ray. Each trial is a Tune function trainable (`run_trial`) that builds and fits the Ray Train
TorchTrainer of leaf_ray.train (Train V2's pattern; `Tuner(trainer)` no longer exists) and gets the trainer's
validation reports through Tune's TuneReportCallback, on which ASHA stops trials whose alignment (cosine to
the teacher on held-out mix rows) trails. The teacher cache of the text mix is built once by the driver
before the tuner starts; trials receive its rows through the object store and never run the teacher. The
teacher's vectors of the validation texts are cached up front as well, so trials only read them.

Model selection never sees test data: trials are scored on `sweep.validation_split` (SciFact's train queries
and qrels); `evaluate.split` (test) is used only for the final report of the Pareto-optimal students.

Layout under `<storage.runs_root>/<name>/` (a local directory or shared file system):

    sweep_config.json   what the sweep was started with (a restart under another config is refused)
    tune/               Ray Tune's experiment; a restart restores it, so finished trials are not rerun
    trials/<trial id>/  one LEAF run per trial (init_student, checkpoints, metrics.jsonl, student/, trial.json)
    pareto/<trial id>/  the Pareto-optimal students, exported like any run: student/, results.json/.md, plots/
    sweep.json, sweep.md, pareto.png   the report

Resume: an interrupted sweep (Ctrl+C, a lost driver) continues when the same command runs again: Tune restores
the experiment, finished trials keep their results, and an unfinished trial's training resumes from its
latest Ray Train checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from leaf_ray.config import RunConfig, with_values
from leaf_ray.errors import LeafRayError
from leaf_ray.evaluate import (
    MODES,
    beir_dataset,
    build_sources,
    bytes_per_vector,
    evaluate_retrieval,
    run_evaluation,
    student_prompts,
    teacher_cache_source,
)
from leaf_ray.report import headline, plot_pareto, rows_table, write_report
from leaf_ray.storage import local_root, resolve

log = logging.getLogger(__name__)

TRIALS_DIR, TUNE_DIR, FRONT_DIR = "trials", "tune", "pareto"
TRIAL_SUMMARY = "trial.json"  # written by a trial once its student is trained and evaluated
PINNED_CONFIG = "sweep_config.json"
ALIGNMENT = "val_cosine"  # what ASHA ranks trials by (leaf_ray.train reports it)
BASE_LABEL = "base"  # the configured student when sweep.students is empty
TRIAL_MODES = {mode: MODES[mode] for mode in ("student", "asymmetric")}
QUALITY_METRIC = "ndcg_at_10"
SPEED_ROUNDS = 3  # timing rounds per encoder (best kept): short samples on a shared machine are noisy


class SweepError(LeafRayError, ValueError):
    """A sweep that cannot run as configured; the message names the config field or folder."""


class SweepInterrupted(RuntimeError):
    """The tuner stopped before every trial finished; running the same command again continues."""


# -- the search space --------------------------------------------------------------------------------------

def search_space(cfg: RunConfig) -> dict[str, Any]:
    """Tune's param_space: a grid over student labels and every `sweep.grid` key."""
    from ray import tune

    return {"student": tune.grid_search(list(cfg.sweep.students) or [BASE_LABEL]),
            **{key: tune.grid_search(list(values)) for key, values in cfg.sweep.grid.items()}}


def grid_points(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every trial's parameters, as search_space expands them."""
    keys = ["student", *cfg.sweep.grid]
    choices = [list(cfg.sweep.students) or [BASE_LABEL], *cfg.sweep.grid.values()]
    return [dict(zip(keys, values)) for values in itertools.product(*choices)]


def trial_label(cfg: RunConfig, params: Mapping[str, Any]) -> str:
    """A short human name: the student label and the grid values (`tl-0-5 lr=0.0003`)."""
    return " ".join([params["student"], *(f"{key.rsplit('.', 1)[-1]}={params[key]}" for key in cfg.sweep.grid)])


def trial_config(cfg: RunConfig, params: Mapping[str, Any], trial_id: str) -> RunConfig:
    """One trial's run config: the sweep's config with the trial's overrides, run `<sweep>/trials/<trial_id>`."""
    overrides = {**cfg.sweep.students.get(params["student"], {}), **{key: params[key] for key in cfg.sweep.grid}}
    return with_values(cfg, {**overrides, "name": trial_id, "storage.runs_root": str(sweep_dir(cfg) / TRIALS_DIR)},
                       source=f"sweep trial '{trial_label(cfg, params)}'")


def sweep_dir(cfg: RunConfig) -> Path:
    """The sweep's folder: trials, Tune's experiment and the report (Tune needs a file system here)."""
    return cfg.storage.runs_path() / cfg.name


def _absolute_model(name: str | None) -> str | None:
    path = Path(name).expanduser() if name else None
    return str(path.resolve()) if path is not None and not path.is_absolute() and path.exists() else name


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with every local path made absolute: Tune runs each trial in its own working directory."""
    values: dict[str, Any] = {"data.root": str(cfg.data.resolved_root().resolve()),
                              "teacher.model": _absolute_model(cfg.teacher.model),
                              "student.model": _absolute_model(cfg.student.model),
                              "sweep.students": {label: {k: _absolute_model(v) if k == "student.model" else v
                                                         for k, v in overrides.items()}
                                                 for label, overrides in cfg.sweep.students.items()}}
    for field in ("cache_root", "runs_root", "local_cache"):
        root = getattr(cfg.storage, field)
        local = local_root(root, f"storage.{field}") if root is not None else None
        if local is not None:
            values[f"storage.{field}"] = str(local)
    return with_values(cfg, values, source="sweep paths")


def check_sweep(cfg: RunConfig, train_rows: int) -> list[RunConfig]:
    """Every trial's config, built up front so a bad key or value fails before any trial starts."""
    from leaf_ray.train import total_steps

    if not cfg.evaluate.datasets:
        raise SweepError("evaluate.datasets is empty: a sweep ranks students by retrieval on a validation split")
    if cfg.sweep.validation_split == cfg.evaluate.split:
        raise SweepError(f"sweep.validation_split and evaluate.split are both {cfg.evaluate.split!r}: model "
                         "selection must not look at the split the final report scores")
    if not cfg.evaluate.throughput_samples:
        raise SweepError("evaluate.throughput_samples is 0: the Pareto front needs every student's speed")
    configs = [trial_config(cfg, params, "check") for params in grid_points(cfg)]
    for params, trial in zip(grid_points(cfg), configs):
        if trial.train.mode != "cache":
            raise SweepError(f"sweep trial '{trial_label(cfg, params)}': train.mode must be 'cache' (trials share "
                             "one teacher cache; streaming would run the teacher again in every trial)")
        total_steps(trial.train, train_rows)  # raises, naming train.batch_size, when a trial cannot train
    return configs


def pin_config(cfg: RunConfig) -> None:
    """Record what the sweep runs with; a restart under the same name must run the same sweep."""
    pinned = {key: value for key, value in cfg.model_dump().items() if key in ("data", "teacher", "student", "train")}
    pinned["sweep"] = cfg.sweep.model_dump(include={"students", "grid", "validation_split", "validation_max_queries",
                                                    "validation_max_corpus", "asha"})
    pinned = json.loads(json.dumps(pinned, default=str))  # compared as stored
    path = sweep_dir(cfg) / PINNED_CONFIG
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(f"{section}.{key}" for section in pinned for key in
                         set(pinned[section]) | set(before.get(section, {}))
                         if pinned[section].get(key) != before.get(section, {}).get(key))
        if changed:
            raise SweepError(f"sweep {cfg.name!r} at {path.parent} was started with another config (differs in "
                             f"{', '.join(changed)}); pick a new `name` or delete that folder")
        return
    resolve(path).write_text(json.dumps(pinned, indent=1, default=str))


# -- resources -----------------------------------------------------------------------------------------------

def trial_resources(configs: Sequence[RunConfig]) -> dict[str, float]:
    """What the largest trial holds while it trains: its Tune driver plus its Ray Train workers."""
    need: dict[str, float] = {}
    for trial in configs:
        tc = trial.train
        per = {"CPU": trial.sweep.cpus_per_trial + tc.num_workers * tc.cpus_per_worker}
        if tc.gpus_per_worker:
            per["GPU"] = tc.num_workers * tc.gpus_per_worker
        for name, amount in tc.resources_per_worker.items():
            per[name] = tc.num_workers * amount
        need = {k: max(need.get(k, 0.0), per.get(k, 0.0)) for k in need | per}
    return need


def concurrent_trials(configs: Sequence[RunConfig], cluster: Mapping[str, float]) -> int:
    """`sweep.max_concurrent_trials`, else as many trials as the cluster's resources hold at once (GPUs per
    trial on GPU clusters, fractional CPUs on small machines). A resource the cluster lacks yet (an autoscaler
    adds it) allows one trial at a time."""
    if configs[0].sweep.max_concurrent_trials:
        return configs[0].sweep.max_concurrent_trials
    need = trial_resources(configs)
    fits = [math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return max(1, min(fits or [1]))


# -- the trial -------------------------------------------------------------------------------------------------

class AlignmentReportCallback(TuneReportCallback):
    """Tune's TuneReportCallback for the reports ASHA acts on: those that carry the validation cosine, before
    the last step. Tune rejects results without the scheduler's metric (loss logs stay in metrics.jsonl), and a
    stop at the last step would kill a trained trial before its evaluation."""

    def __init__(self, last_step: int):
        super().__init__()
        self.last_step = last_step

    def after_report(self, run_context, metrics, checkpoint):
        if ALIGNMENT in metrics[0] and metrics[0].get("step", 0) < self.last_step:
            super().after_report(run_context, metrics, checkpoint)


def validation_records(cfg: RunConfig, sources, modes) -> list[dict]:
    """Retrieval records on `sweep.validation_split` of every evaluate.datasets entry (never the test split),
    at every dims x quantization of the evaluate section."""
    sweep, ev = cfg.sweep, cfg.evaluate
    records = []
    for name in ev.datasets:
        data = beir_dataset(cfg.data, name, sweep.validation_split, sweep.validation_max_corpus,
                            sweep.validation_max_queries, ev.seed)
        records += evaluate_retrieval(data, sources, ev.dims, ev.quantizations, modes=modes, progress=False)
    return records


def teacher_validation(cfg: RunConfig) -> list[dict]:
    """The teacher's own validation scores (the report's reference). Run by the driver before the tuner, it
    also caches the teacher's vectors of the validation texts, which every trial then only reads."""
    teacher = teacher_cache_source(cfg.teacher, cfg.storage.cache_location(), cfg.allow_hub,
                                   model_root=cfg.storage.local_cache_path())
    return validation_records(cfg, {"teacher": teacher}, {"teacher": MODES["teacher"]})


def run_trial(params: dict, *, cfg_tree: dict, inputs) -> None:
    """The Tune function trainable: train one student with Ray Train (resuming its run if a restored sweep
    restarts it), evaluate it on the validation split, write trial.json and report the final metrics."""
    import ray.tune
    import torch

    from leaf_ray.student import read_manifest
    from leaf_ray.train import run_dir_for, total_steps, train_student

    cfg = trial_config(RunConfig.model_validate(cfg_tree), params, ray.tune.get_context().get_trial_id())
    summary_path = resolve(run_dir_for(cfg) / TRIAL_SUMMARY)
    if summary_path.is_file():  # evaluated before an interruption cut its report to Tune short: only report
        summary = json.loads(summary_path.read_text())
    else:
        torch.set_num_threads(max(1, math.ceil(cfg.sweep.cpus_per_trial)))
        last_step = total_steps(cfg.train, inputs.train_rows)
        trained = train_student(cfg, inputs, callbacks=[AlignmentReportCallback(last_step)])
        sources = build_sources(str(trained.student_path), cfg.teacher, cfg.storage.local_cache_path(),
                                cfg.evaluate.batch_size, cfg.allow_hub, teacher_cache=cfg.storage.cache_location())
        counts = read_manifest(trained.student_path)["param_counts"]
        summary = {"trial_id": cfg.name, "label": trial_label(cfg, params), "params": dict(params),
                   "student_path": str(trained.student_path), "param_counts": counts, "train": trained.metrics,
                   "records": validation_records(cfg, sources, TRIAL_MODES)}
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
    ray.tune.report({ALIGNMENT: summary["train"][ALIGNMENT], "step": summary["train"]["step"],
                     **{f"val_{QUALITY_METRIC}_{mode}": _value(summary["records"], mode, QUALITY_METRIC)
                        for mode in TRIAL_MODES}})


# -- the tuner -------------------------------------------------------------------------------------------------

def _trial_dirname(trial) -> str:
    return trial.trial_id


def make_tuner(cfg: RunConfig, inputs, configs: Sequence[RunConfig]):
    """A new Tuner, or the sweep's experiment restored (finished trials kept, unfinished and errored ones
    continued) when `<sweep>/tune` holds one."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from leaf_ray.train import total_steps

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg_tree=cfg.model_dump(), inputs=inputs),
        {"CPU": cfg.sweep.cpus_per_trial})
    path = sweep_dir(cfg) / TUNE_DIR
    if tune.Tuner.can_restore(str(path)):
        log.info("restoring the sweep's Tune experiment at %s", path)
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    asha = cfg.sweep.asha
    longest = max(total_steps(trial.train, inputs.train_rows) for trial in configs)
    scheduler = ASHAScheduler(time_attr="step", metric=ALIGNMENT, mode="max", max_t=longest,
                              grace_period=min(asha.grace_period_steps, longest),
                              reduction_factor=asha.reduction_factor, stop_last_trials=False) if asha.enabled else None
    concurrency = concurrent_trials(configs, ray.cluster_resources())
    log.info("sweep %s: %d trials, up to %d at a time", cfg.name, len(configs), concurrency)
    return tune.Tuner(trainable, param_space=search_space(cfg),
                      tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrency,
                                                  trial_dirname_creator=_trial_dirname),
                      run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir(cfg)),
                                                failure_config=tune.FailureConfig(max_failures=0)))


def run_trials(cfg: RunConfig, inputs) -> tuple[list[dict], int]:
    """Run (or continue) the sweep's trials. Returns one row per trial (trial.json for evaluated ones, the last
    report for those ASHA stopped, the error for failed ones) and the count of placement groups the trials left
    behind (see leftover_placement_groups). Raises SweepInterrupted if any trial is left."""
    configs = check_sweep(cfg, inputs.train_rows)
    before = _live_placement_groups()
    rows = [_trial_row(cfg, result) for result in make_tuner(cfg, inputs, configs).fit()]
    done = sum(row["status"] != "unfinished" for row in rows)
    if done < len(configs):  # an interrupted tuner returns normally, holding only the trials it had started
        raise SweepInterrupted(f"sweep {cfg.name!r} stopped with {len(configs) - done} of {len(configs)} trials "
                               "unfinished; run the same command again to continue (finished trials are kept)")
    return sorted(rows, key=lambda row: row["trial_id"]), leftover_placement_groups(before)


def _live_placement_groups() -> set[str]:
    import ray

    return {pg for pg, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def leftover_placement_groups(before: set[str], wait_s: float = 30.0) -> int:
    """Placement groups created during the tuner and still held after it. A trial ASHA stops is killed with
    its Ray Train run, whose workers' placement group Ray Train's cleaner then removes within seconds; if the
    cleaner fails, each stopped trial keeps its workers' CPUs/GPUs reserved and later trials can starve."""
    deadline = time.monotonic() + wait_s
    while (left := _live_placement_groups() - before) and time.monotonic() < deadline:
        time.sleep(1)
    if left:
        log.warning("%d placement groups of stopped trials were not removed: their resources stay reserved", len(left))
    return len(left)


def _trial_row(cfg: RunConfig, result) -> dict:
    trial_id = Path(result.path).name
    summary = sweep_dir(cfg) / TRIALS_DIR / trial_id / TRIAL_SUMMARY
    if summary.is_file():
        return {**json.loads(summary.read_text()), "status": "evaluated"}
    params, last = dict(result.config or {}), result.metrics or {}
    row = {"trial_id": trial_id, "label": trial_label(cfg, params) if params else trial_id, "params": params,
           "train": {k: last[k] for k in ("step", ALIGNMENT) if k in last}}
    if result.error is not None:
        return {**row, "status": "error", "error": str(result.error).strip().splitlines()[-1][:300]}
    # Tune marks the result a scheduler stops `done`; a trial cut off by an interruption has no such result
    return {**row, "status": "stopped early (ASHA)" if last.get("done") else "unfinished"}


# -- speed, the Pareto front, the test report ---------------------------------------------------------------

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


def _value(records: Sequence[dict], mode: str, metric: str, dims=None, quantization="float32"):
    """Mean of `metric` over datasets at (dims, quantization), by default the full dims in float32; None if absent."""
    chosen = [r for r in records if (r["mode"], r["metric"], r["quantization"]) == (mode, metric, quantization)]
    dims = dims or max((r["dims"] for r in chosen), default=None)
    values = [r["value"] for r in chosen if r["dims"] == dims]
    return sum(values) / len(values) if values else None


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
                           "quality": _value(row["records"], cfg.sweep.quality_mode, QUALITY_METRIC, dims,
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


# -- the report -------------------------------------------------------------------------------------------------

def write_sweep_report(cfg: RunConfig, rows: Sequence[dict], reference: Sequence[dict], speed: Mapping[str, dict],
                       points: Sequence[dict], front: Sequence[int], tested: Mapping[str, list[dict]],
                       meta: dict) -> dict[str, Path]:
    """sweep.json (everything), sweep.md (tables) and pareto.png in the sweep's folder."""
    out, sweep = sweep_dir(cfg), cfg.sweep
    quality_label = f"validation {QUALITY_METRIC} ({sweep.quality_mode})"
    plot = plot_pareto(points, front, out / "pareto.png", quality_label, f"{sweep.speed_metric} (this machine)",
                       f"Sweep {cfg.name}: Pareto front over quality, speed and bytes per vector")
    teacher_params = next((r["param_counts"]["teacher"] for r in rows if r.get("param_counts")), None)
    grid_keys = list(sweep.grid)

    header = ["trial", "student", *grid_keys, "status", "steps", "params (M)", "x smaller", "docs/s", "queries/s",
              "val cosine (mix)", f"val {QUALITY_METRIC} student", f"val {QUALITY_METRIC} asymmetric",
              "cosine to teacher (queries)"]
    table = [["teacher", cfg.teacher.model, *[""] * len(grid_keys), "", "",
              teacher_params / 1e6 if teacher_params else None, 1.0, speed["teacher"]["docs_per_s"],
              speed["teacher"]["queries_per_s"], None, _value(reference, "teacher", QUALITY_METRIC), None, None]]
    for row in rows:
        counts, records, train = row.get("param_counts") or {}, row.get("records", []), row.get("train", {})
        table.append([row["trial_id"], row["params"].get("student"), *[row["params"].get(k) for k in grid_keys],
                      row["status"] + (f": {row['error']}" if row.get("error") else ""), train.get("step"),
                      counts["total"] / 1e6 if counts else None, counts.get("ratio"),
                      speed.get(row["trial_id"], {}).get("docs_per_s"), speed.get(row["trial_id"], {}).get("queries_per_s"),
                      train.get(ALIGNMENT), _value(records, "student", QUALITY_METRIC),
                      _value(records, "asymmetric", QUALITY_METRIC),
                      _value(records, "student", "cosine_to_teacher_queries")])

    variants = list(dict.fromkeys((p["dims"], p["quantization"]) for p in points))
    per_variant = []
    for mode in TRIAL_MODES:
        evaluated = [r for r in rows if r["status"] == "evaluated"]
        per_variant += [f"### {mode}", "", rows_table(
            ["trial", *[f"{d}d {q} ({bytes_per_vector(d, q)} B)" for d, q in variants]],
            [["teacher", *[_value(reference, "teacher", QUALITY_METRIC, d, q) for d, q in variants]]]
            + [[r["trial_id"], *[_value(r["records"], mode, QUALITY_METRIC, d, q) for d, q in variants]]
               for r in evaluated])]

    split = cfg.evaluate.split
    front_rows = [[p["trial_id"], p["label"], p["dims"], p["quantization"], p["bytes_per_vector"], p["quality"],
                   p["speed"], *[_value(tested.get(p["trial_id"], []), mode, QUALITY_METRIC, p["dims"], p["quantization"])
                                 for mode in TRIAL_MODES]] for p in (points[i] for i in front)]
    lines = [f"# Sweep {cfg.name}: {cfg.teacher.model} -> leaves", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "## Trials", "", (f"Validation: {', '.join(cfg.evaluate.datasets)} split "
                                    f"`{sweep.validation_split}`; speed measured side by side on this machine "
                                    "after the sweep."), "",
              rows_table(header, table), f"## Validation {QUALITY_METRIC} per dims x quantization (bytes per vector)",
              "", *per_variant,
              f"## Pareto front: {quality_label} vs {sweep.speed_metric} vs bytes per vector", "",
              (f"Test scores ({', '.join(cfg.evaluate.datasets)} split `{split}`) of the Pareto-optimal students "
               f"at the same dims and quantization; full reports under `{FRONT_DIR}/<trial>/`."), "",
              rows_table(["trial", "student", "dims", "quantization", "bytes/vector", "val quality", sweep.speed_metric,
                          f"{split} {QUALITY_METRIC} student", f"{split} {QUALITY_METRIC} asymmetric"], front_rows),
              f"![pareto]({Path(plot.path).name})", ""]
    md_path = out / "sweep.md"
    resolve(md_path).write_text("\n".join(lines))
    json_path = out / "sweep.json"
    resolve(json_path).write_text(json.dumps(
        {"meta": meta, "teacher_validation": list(reference), "throughput": dict(speed), "trials": list(rows),
         "points": [{**p, "pareto": i in set(front)} for i, p in enumerate(points)],
         "test": {trial: records for trial, records in tested.items()}}, indent=1, default=str))
    return {"markdown": md_path, "json": json_path, "plot": Path(plot.path)}
