"""The Tune function trainable that runs each trial in its own Ray worker, and the callback that passes Ray
Train's validation reports on to Tune. A module of its own because it imports Ray Tune at module level (the
callback subclasses TuneReportCallback): only the tuner imports it, when it builds the Tuner. Tune pickles
`run_trial` by reference, so it stays a module-level function."""

from __future__ import annotations

import json
import math
import time

from ray.tune.integration.ray_train import TuneReportCallback

from leaf_ray.config import RunConfig
from leaf_ray.progress import quiet_library_bars
from leaf_ray.recipe import LeafRun
from leaf_ray.storage import resolve
from leaf_ray.sweep.space import TRIAL_SUMMARY, trial_config, trial_label
from leaf_ray.sweep.validation import ALIGNMENT, QUALITY_METRIC, TRIAL_MODES, mean_metric, validation_records


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


def run_trial(params: dict, *, cfg_tree: dict, inputs) -> None:
    """The Tune function trainable: train one student with Ray Train (resuming its run if a restored sweep
    restarts it), evaluate it on the validation split, write trial.json and report the final metrics."""
    import ray.tune
    import torch

    from leaf_ray.student import read_manifest
    from leaf_ray.train import total_steps

    quiet_library_bars()
    sweep = RunConfig.model_validate(cfg_tree)
    run = LeafRun(trial_config(sweep, params, ray.tune.get_context().get_trial_id()),
                  tracking_parent=str(sweep.storage.runs_location() / sweep.name))
    cfg = run.cfg
    summary_path = resolve(run.folder.path / TRIAL_SUMMARY)
    if summary_path.is_file():  # evaluated before an interruption cut its report to Tune short: only report
        summary = json.loads(summary_path.read_text())
    else:
        torch.set_num_threads(max(1, math.ceil(cfg.sweep.cpus_per_trial)))
        last_step = total_steps(cfg.train, inputs.train_rows)
        started = time.monotonic()
        trained = run.train(inputs, callbacks=[AlignmentReportCallback(last_step)])
        train_seconds = time.monotonic() - started
        sources = run.sources(trained.student_path)
        counts = read_manifest(trained.student_path)["param_counts"]
        summary = {"trial_id": cfg.name, "label": trial_label(cfg, params), "params": dict(params),
                   "student_path": str(trained.student_path), "param_counts": counts, "train": trained.metrics,
                   "train_seconds": train_seconds,  # this run's training call (a resumed trial's last part)
                   "records": validation_records(cfg, sources, TRIAL_MODES)}
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
    scores = {f"val_{QUALITY_METRIC}_{mode}": mean_metric(summary["records"], mode, QUALITY_METRIC)
              for mode in TRIAL_MODES}
    if run.tracked is not None:
        run.tracked.finish(scores, summary)
    ray.tune.report({ALIGNMENT: summary["train"][ALIGNMENT], "step": summary["train"]["step"], **scores})
