"""MLflow tracking against a real local MLflow store (SQLite in the test's folder): one MLflow run per run folder,
found again on a rerun, metrics.jsonl's records as metrics, the results and the student at the finish. The
distill and sweep jobs' own runs are checked in tests/test_distill.py and tests/test_sweep.py."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from leaf_ray.config import ConfigError, RunConfig, TrackingConfig
from leaf_ray.evaluate import EvaluationResult
from leaf_ray.recipe import LeafRun
from leaf_ray.tracking import RUN_FOLDER_TAG, RunMetrics, TrackedRun, TrackingError, flat_params, metric_values

from tests import test_model_card
from tests.conftest import tiny_teacher_config

leaf = test_model_card.leaf  # its module-scoped exported leaf, a fixture

RECORDS = [  # metrics.jsonl records as training's rank 0 writes them
    {"time": 1000.0, "event": "start", "step": 0, "epoch": 0, "resumed": False, "weights_digest": "ab12",
     "world_size": 1, "val_cosine": 0.5, "val_loss": 1.0},
    {"time": 1001.5, "event": "log", "step": 10, "epoch": 0, "samples": 160, "loss": 0.9, "lr": 1e-4,
     "samples_per_s": 40.0},
    {"time": 1002.0, "event": "validate", "step": 10, "epoch": 0, "samples": 160, "val_cosine": 0.6,
     "val_loss": 0.8},
    {"time": 1003.0, "event": "end", "step": 20, "epoch": 1, "samples": 320, "samples_per_s": 41.0,
     "steps_this_run": 20, "val_cosine": 0.7, "val_loss": 0.6},
]


def config(tmp_path, **tracking) -> RunConfig:
    return RunConfig(name="tiny", tracking={"mlflow": True, **tracking},
                     storage={"runs_root": str(tmp_path / "runs"), "cache_root": str(tmp_path / "cache")})


def assert_tracked_as_logged(client: MlflowClient, run_id: str, metrics_jsonl, kills: int = 0) -> None:
    """The MLflow run's metric histories are the numeric fields of metrics.jsonl, record by record (NaN too).
    A training process killed `kills` times may each time have died between a record's append to metrics.jsonl
    and its MLflow write: each key's history may then lack up to that many of the file's points, never add one."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    keys = {k for r in records for k in metric_values(r)}
    assert keys and keys <= set(client.get_run(run_id).data.metrics)
    for key in keys:
        logged = [repr(point) for point in history(client, run_id, key)]
        expected = [repr(point) for point in expected_history(records, key)]
        if not kills:
            assert logged == expected, key
            continue
        remaining = iter(expected)
        assert all(point in remaining for point in logged), key  # in order, each one of the file's
        assert len(expected) - len(logged) <= kills, key


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: (m.step, m.timestamp))]


def expected_history(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records if key in r]


def test_records_become_metrics_at_their_step_and_a_rerun_finds_the_same_run(tmp_path):
    cfg = config(tmp_path)
    run = TrackedRun(cfg, "runs/tiny")
    assert run.uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve().as_posix()}"
    metrics = RunMetrics(run.target)
    for record in RECORDS[:2]:
        metrics.log(record)
    again = TrackedRun(cfg, "runs/tiny")  # the job rerun: resumed training logs to the same run
    assert again.run_id == run.run_id
    for record in RECORDS[2:]:
        RunMetrics(again.target).log(record)

    client = MlflowClient(run.uri)
    logged = client.get_run(run.run_id)
    assert set(logged.data.metrics) == {k for r in RECORDS for k in metric_values(r)}
    assert not {"step", "time", "resumed", "event", "weights_digest"} & set(logged.data.metrics)
    records = tmp_path / "metrics.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert_tracked_as_logged(client, run.run_id, records)
    assert logged.data.params["train.lr"] == json.dumps(cfg.train.lr)
    assert logged.data.params["data.sources"] == json.dumps(cfg.model_dump(mode="json")["data"]["sources"])
    assert logged.data.tags[RUN_FOLDER_TAG] == "runs/tiny" and logged.info.run_name == "tiny"
    assert TrackedRun(cfg, "runs/other").run_id != run.run_id


def test_flat_params_are_the_dotted_override_keys():
    assert flat_params({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": {}, "g": None}) == {
        "a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "{}", "g": "null"}


def test_a_sweeps_trials_nest_under_it_and_stopped_ones_are_ended(tmp_path):
    cfg = config(tmp_path)
    sweep = TrackedRun(cfg, "runs/sweep")
    trials = [TrackedRun(cfg, f"runs/sweep/trials/{i}", parent="runs/sweep") for i in range(3)]
    trials[0].finish({"val_ndcg_at_10_student": 0.5})
    assert sweep.end_children() == 2  # the two an early stop left running
    client = MlflowClient(sweep.uri)
    for trial, status in zip(trials, ("FINISHED", "KILLED", "KILLED")):
        run = client.get_run(trial.run_id)
        assert (run.info.status, run.data.tags["mlflow.parentRunId"]) == (status, sweep.run_id)
    assert client.get_run(sweep.run_id).info.status == "RUNNING"


def test_a_finished_run_logs_its_scores_results_and_student(tiny_teacher, leaf, tmp_path):
    cfg = RunConfig(name="tiny", teacher=tiny_teacher_config(tiny_teacher), tracking={"mlflow": True},
                    storage={"runs_root": str(tmp_path / "runs"), "cache_root": str(tmp_path / "cache")})
    run = LeafRun(cfg)
    shutil.copytree(leaf, run.folder.path / "student")
    records = test_model_card.metric_records()
    run.finish(EvaluationResult(records, [], {}), "tiny run", test_model_card.SUMMARY)

    client = MlflowClient(run.tracked.uri)
    logged = client.get_run(run.tracked.run_id)
    assert logged.info.status == "FINISHED"
    full = {(r["dataset"], r["split"], r["metric"], r["mode"]): r["value"] for r in records
            if r["dims"] == 32 and r["quantization"] == "float32"}
    assert logged.data.metrics["scifact.test.ndcg_at_10.student"] == full["scifact", "test", "ndcg_at_10", "student"]
    assert (logged.data.metrics["stsbenchmark.test.cosine_spearman.asymmetric"]
            == full["stsbenchmark", "test", "cosine_spearman", "asymmetric"])
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run.tracked.run_id, "", str(artifacts))
    assert json.loads((artifacts / "results.json").read_text())["records"] == records
    assert json.loads((artifacts / "config.json").read_text()) == cfg.model_dump(mode="json")
    assert (tmp_path / "runs" / "mlflow-artifacts").is_dir()  # beside the default store, not in ./mlruns

    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(artifacts / "student"), device="cpu", local_files_only=True)
    assert student.encode(["a query"]).shape == (1, 32)


def test_without_a_local_runs_root_the_store_must_be_named():
    with pytest.raises(ConfigError, match="tracking.uri"):
        TrackingConfig(mlflow=True).resolved_uri(RunConfig(storage={"runs_root": "s3://bucket/runs"}).storage)
    assert TrackingConfig(uri="http://127.0.0.1:5000").resolved_uri(RunConfig().storage) == "http://127.0.0.1:5000"


def test_a_store_that_refuses_is_one_clear_error(tmp_path):
    (tmp_path / "not-a-dir").write_text("a file where the store's folder should be")
    with pytest.raises(TrackingError, match="tracking: the MLflow store refused"):
        TrackedRun(config(tmp_path, uri=f"sqlite:///{tmp_path}/not-a-dir/mlflow.db"), "runs/tiny")
