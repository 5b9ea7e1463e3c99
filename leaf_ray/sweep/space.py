"""The sweep's search space and folder: the grid of trials, each trial's run config, the checks and the pinned
config a restart is compared against, and how many trials the cluster holds at once. Plain config arithmetic
that imports no Ray, so a bad sweep fails before any trial starts and tests need no cluster."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leaf_ray.config import RunConfig, with_values
from leaf_ray.errors import LeafRayError
from leaf_ray.storage import local_root, resolve

TRIALS_DIR, TUNE_DIR, FRONT_DIR = "trials", "tune", "pareto"
TRIAL_SUMMARY = "trial.json"  # written by a trial once its student is trained and evaluated
PINNED_CONFIG = "sweep_config.json"
BASE_LABEL = "base"  # the configured student when sweep.students is empty


class SweepError(LeafRayError, ValueError):
    """A sweep that cannot run as configured; the message names the config field or folder."""


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
    if cfg.tracking.mlflow:  # the trials' runs_root is the sweep's folder: they share the sweep's default store
        values["tracking.uri"] = cfg.tracking.resolved_uri(cfg.storage)
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
