"""The driver's side of Ray Tune: the Tuner (new, or the sweep's experiment restored), the run of every trial,
one row per trial from Tune's results, and the placement groups stopped trials may leave behind."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from leaf_ray.config import RunConfig
from leaf_ray.sweep.space import (
    TRIAL_SUMMARY,
    TRIALS_DIR,
    TUNE_DIR,
    check_sweep,
    concurrent_trials,
    search_space,
    sweep_dir,
    trial_label,
)
from leaf_ray.sweep.validation import ALIGNMENT

log = logging.getLogger(__name__)


class SweepInterrupted(RuntimeError):
    """The tuner stopped before every trial finished; running the same command again continues."""


def _trial_dirname(trial) -> str:
    return trial.trial_id


def make_tuner(cfg: RunConfig, inputs, configs: Sequence[RunConfig]):
    """A new Tuner, or the sweep's experiment restored (finished trials kept, unfinished and errored ones
    continued) when `<sweep>/tune` holds one."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from leaf_ray.sweep.trial import run_trial
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
