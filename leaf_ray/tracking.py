"""A run's MLflow record (the `tracking` section): one MLflow run per leaf-ray run folder, found again by its
folder when the job is rerun, so a resumed run keeps one curve.

The process that trains (the job's driver, or a sweep's trial) opens the run and logs the config as parameters;
training's rank 0 logs every record it appends to metrics.jsonl as metrics at that record's step (`RunMetrics`,
what `train.log_every_steps` sets the cadence of); the finish logs the results, the report and the student.

This talks to MLflow's client directly rather than through Ray's `setup_mlflow` / `MLflowLoggerCallback`: those
create a new MLflow run on every call, where a resumed run, a restored sweep and the rank-0 worker must all write
to the one run of their folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from leaf_ray.config import RunConfig
from leaf_ray.errors import LeafRayError

RUN_FOLDER_TAG = "leaf_ray.run_folder"  # finds a folder's MLflow run again
NOT_METRICS = ("step", "time")  # what metrics.jsonl records carry besides metrics: the x axis and the clock


class TrackingError(LeafRayError, RuntimeError):
    """MLflow cannot be used as configured (not installed, or the tracking store refused)."""


def _mlflow():
    try:
        import mlflow
    except ModuleNotFoundError as exc:
        raise TrackingError("tracking.mlflow is on but MLflow is not installed: "
                            "pip install 'leaf-ray[tracking]'") from exc
    for name in ("alembic", "mlflow.store.db.utils"):  # schema migrations announce themselves at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def flat_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> values as MLflow params (strings; lists and mappings as JSON), like the CLI's overrides."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def metric_values(record: Mapping) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record (booleans and labels are not metrics)."""
    return {key: float(value) for key, value in record.items()
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class RunMetrics:
    """Logs metrics.jsonl records to one MLflow run; built in training's rank 0 from `TrackedRun.target`."""

    def __init__(self, target: Mapping[str, str]):
        from mlflow.tracking import MlflowClient

        _mlflow()
        self.client, self.run_id = MlflowClient(tracking_uri=target["uri"]), target["run_id"]

    def log(self, record: Mapping) -> None:
        from mlflow.entities import Metric

        step, stamp = int(record.get("step", 0)), int(record["time"] * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, step)
                                                    for key, value in metric_values(record).items()])


class TrackedRun:
    """The MLflow run of `cfg`'s run folder: created with the config as parameters, or found again on a rerun
    (and set running again). `parent`: the folder of the run this one is nested under (a sweep's, for its
    trials)."""

    def __init__(self, cfg: RunConfig, folder: str, parent: str | None = None):
        mlflow = _mlflow()
        from mlflow.tracking import MlflowClient

        tracking = cfg.tracking
        self.uri = tracking.resolved_uri(cfg.storage)
        self.log_student = tracking.log_student
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name(tracking.experiment)
            # an SQLite store keeps its artifacts beside it, not in the working directory's ./mlruns (a server
            # has its own artifact root)
            artifacts = (str(Path(self.uri.removeprefix("sqlite:///")).with_name("mlflow-artifacts"))
                         if self.uri.startswith("sqlite:///") else None)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(tracking.experiment, artifact_location=artifacts))
            found = self._run_of(experiment_id, folder)
            parent_id = self._run_of(experiment_id, parent) if parent else None
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            reason = (getattr(exc, "message", None) or str(exc)).splitlines()[0]
            raise TrackingError(f"tracking: the MLflow store refused: {reason}") from exc
        self.experiment_id = experiment_id
        if found:
            self.run_id = found
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_FOLDER_TAG: folder, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.name, tags=tags).info.run_id
            tree = cfg.model_dump(mode="json")
            items = [mlflow.entities.Param(k, v[:6000]) for k, v in flat_params(tree).items()]  # MLflow's value limit
            for start in range(0, len(items), 100):  # and its batch limit
                self.client.log_batch(self.run_id, params=items[start:start + 100])
            self.client.log_dict(self.run_id, tree, "config.json")

    def _run_of(self, experiment_id: str, folder: str) -> str | None:
        quoted = folder.replace("'", "\\'")
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_FOLDER_TAG}` = '{quoted}'",
                                        max_results=1)
        return found[0].info.run_id if found else None

    @property
    def target(self) -> dict[str, str]:
        """What training's rank 0 needs to log to this run (RunMetrics)."""
        return {"uri": self.uri, "run_id": self.run_id}

    def finish(self, metrics: Mapping[str, float], results: Mapping | None = None,
               student: Path | None = None) -> None:
        """Log the final `metrics` (at step 0: they are not a curve), `results` as results.json and, with
        tracking.log_student, the `student` directory; then end the run."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()])
        if results is not None:
            self.client.log_text(self.run_id, json.dumps(results, indent=1, default=str), "results.json")
        if student is not None and self.log_student:
            self.client.log_artifacts(self.run_id, str(student), "student")
        self.client.set_terminated(self.run_id, "FINISHED")

    def end_children(self, status: str = "KILLED") -> int:
        """End the nested runs still marked running (sweep trials ASHA stopped: their process was ended before
        it could); returns how many."""
        running = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.run_id}' and attributes.status = 'RUNNING'"))
        for run in running:
            self.client.set_terminated(run.info.run_id, status)
        return len(running)


def score_metrics(records: list[dict]) -> dict[str, float]:
    """`<dataset>.<split>.<metric>.<mode>` at full dims and float32, the report's headline numbers, as metrics."""
    from leaf_ray.report import full_dims_scores

    return {f"{dataset}.{split}.{metric}.{mode}": value
            for dataset, split, _, metric, _, by_mode in full_dims_scores(records) for mode, value in by_mode.items()}
