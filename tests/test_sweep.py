"""Ray Tune sweeps: the search space and its checks, the Pareto front, and a real 2 x 2 sweep of tiny students
on local Ray that is interrupted (SIGINT) after its first trial and continued by running the command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from leaf_ray.config import (
    ConfigError,
    RunConfig,
    StorageConfig,
    SweepConfig,
    TrainConfig,
)
from leaf_ray.sweep import (
    SweepError,
    check_sweep,
    concurrent_trials,
    grid_points,
    pareto_front,
    pin_config,
    trial_config,
    trial_resources,
)
from leaf_ray.sweep.validation import TRIAL_MODES, mean_metric
from tests.conftest import REPO, load_script
from tests.test_distill import run_job, tiny_run_config

# -- the search space and the front (no Ray) -----------------------------------------------------------------


def sweep_config(tmp_path: Path, **sweep) -> RunConfig:
    return RunConfig(name="s", storage=StorageConfig(runs_root=str(tmp_path / "runs")),
                     sweep=SweepConfig(**{"students": {"a": {"student.layers": [0]}, "b": {"student.layers": [1, 2]}},
                                          "grid": {"train.lr": [1e-4, 3e-4]}, **sweep}))


def test_pareto_front_on_a_hand_made_table():
    points = [
        {"quality": 0.70, "speed": 100, "bytes": 1536},  # best quality
        {"quality": 0.65, "speed": 300, "bytes": 1536},  # faster
        {"quality": 0.60, "speed": 250, "bytes": 1536},  # beaten by the one above on quality and speed
        {"quality": 0.60, "speed": 300, "bytes": 48},  # smallest
        {"quality": 0.60, "speed": 300, "bytes": 48},  # equal to the one above: equals do not dominate
        {"quality": 0.55, "speed": 300, "bytes": 384},  # beaten by the 48-byte point on quality and bytes
        {"quality": 0.70, "speed": 100, "bytes": 3072},  # as good as the first but bigger
    ]
    assert pareto_front(points, maximize=("quality", "speed"), minimize=("bytes",)) == [0, 1, 3, 4]
    assert pareto_front(points, maximize=("quality",)) == [0, 6]
    assert pareto_front(points, minimize=("bytes",)) == [3, 4]
    assert pareto_front([], maximize=("quality",)) == []


def test_space_expands_to_trial_configs(tmp_path):
    cfg = sweep_config(tmp_path)
    points = grid_points(cfg)
    assert points == [{"student": s, "train.lr": lr} for s in ("a", "b") for lr in (1e-4, 3e-4)]
    trial = trial_config(cfg, {"student": "b", "train.lr": 3e-4}, "t1")
    assert (trial.name, trial.student.layers, trial.train.lr) == ("t1", [1, 2], 3e-4)
    assert trial.storage.runs_root == str(tmp_path / "runs" / "s" / "trials")
    assert cfg.student.layers is None and cfg.train.lr == 1e-4  # the sweep's own config is untouched
    assert [c.student.layers for c in check_sweep(cfg, train_rows=1000)] == [[0], [0], [1, 2], [1, 2]]


def test_space_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"sweep\.grid\.teacher\.model: a sweep may only vary"):
        sweep_config(tmp_path, grid={"teacher.model": ["x"]})
    with pytest.raises(ValueError, match=r"sweep\.grid\.train\.lr: give at least one value"):
        sweep_config(tmp_path, grid={"train.lr": []})
    cfg = sweep_config(tmp_path, students={"a": {"student.layerz": [0]}})
    with pytest.raises(ConfigError, match=r"(?s)sweep trial 'a lr=0.0001'.*student\.layerz: unknown key; did you mean "
                                          r"'student\.layers'"):
        check_sweep(cfg, train_rows=1000)
    with pytest.raises(SweepError, match="sweep.validation_split and evaluate.split"):
        check_sweep(sweep_config(tmp_path, validation_split="test"), train_rows=1000)
    with pytest.raises(SweepError, match="train.mode must be 'cache'"):
        check_sweep(sweep_config(tmp_path, grid={"train.mode": ["stream"]}), train_rows=1000)


def test_concurrency_follows_cluster_resources(tmp_path):
    cpu = check_sweep(sweep_config(tmp_path, cpus_per_trial=0.25), train_rows=1000)
    assert trial_resources(cpu) == {"CPU": 0.75}  # the trial's driver + one 0.5-CPU worker (the base config)
    assert concurrent_trials(cpu, {"CPU": 2.0}) == 2
    gpu_cfg = sweep_config(tmp_path).model_copy(update={"train": TrainConfig(num_workers=2, gpus_per_worker=1)})
    gpu = check_sweep(gpu_cfg, train_rows=1000)
    assert trial_resources(gpu) == {"CPU": 1.25, "GPU": 2}
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert concurrent_trials(gpu, {"CPU": 64.0}) == 1  # no GPU node yet: the autoscaler adds them one trial at a time
    assert concurrent_trials(check_sweep(sweep_config(tmp_path, max_concurrent_trials=3), 1000), {"CPU": 2.0}) == 3


def test_a_restart_with_another_config_is_refused(tmp_path):
    cfg = sweep_config(tmp_path)
    pin_config(cfg)
    pin_config(cfg)  # the same config: fine
    with pytest.raises(SweepError, match=r"started with another config \(differs in sweep\.grid, train\.lr\)"):
        pin_config(cfg.model_copy(update={"train": TrainConfig(lr=5e-4),
                                          "sweep": cfg.sweep.model_copy(update={"grid": {"train.lr": [1.0]}})}))


# -- a real sweep, interrupted and continued ---------------------------------------------------------------------
# 3 trials, one at a time: Tune's grid runs the students l02, l13 and lr5 (l02's layers at lr 5.0) in that order,
# each with the grid's one weight decay. The first run is stopped after l02. l13 trains at lr 1e-5, so it stays at its
# lstsq start and beats l02 at every rung whether or not the restored scheduler has seen l02's results (it has when
# the SIGINT fell between l02's trial.json and its report to Tune); lr5, wrecked by its lr within 6 steps, is
# stopped at ASHA's first rung (step 6). 18 steps per trial.

SWEEP = "tiny-sweep"


def tiny_sweep_config(tmp: Path, teacher: Path) -> Path:
    path = tiny_run_config(tmp, teacher, name=SWEEP, tracking=True)
    config = yaml.safe_load(path.read_text())
    config["train"].update(epochs=1, log_every_steps=6, validate_every_steps=6, keep_checkpoints=1)
    config["evaluate"].update(sts=None, dims=[16], quantizations=["float32", "binary"], max_corpus=150,
                              max_queries=20, throughput_samples=16)
    config["train"]["lr"] = 1e-3
    config["sweep"] = {"students": {"l02": {"student.layers": [0, 2]},
                                    "l13": {"student.layers": [1, 3], "train.lr": 1e-5},
                                    "lr5": {"student.layers": [0, 2], "train.lr": 5.0}},
                       "grid": {"train.weight_decay": [0.01]}, "validation_max_queries": 20,
                       "validation_max_corpus": 150,
                       "max_concurrent_trials": 1, "asha": {"grace_period_steps": 6, "reduction_factor": 2},
                       "test_scores": "all"}
    path.write_text(yaml.safe_dump(config))
    return path


def cache_manifests(cache_root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted((cache_root / "teacher").rglob("manifest.json"))}


def history(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweep(tiny_teacher, tmp_path_factory):
    """The sweep run once until its first trial is evaluated, stopped with SIGINT, then run again to the end."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = tiny_sweep_config(tmp, tiny_teacher)
    folder = tmp / "runs" / SWEEP
    log = (tmp / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "jobs/sweep.py", "--config", str(config)], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 400
        while not list(folder.glob("trials/*/trial.json")) and time.time() < deadline:
            assert first.poll() is None, (tmp / "first.log").read_text()[-5000:]
            time.sleep(1)
        done = list(folder.glob("trials/*/trial.json"))
        assert done, "no trial finished within 400 s: " + (tmp / "first.log").read_text()[-5000:]
        os.kill(first.pid, signal.SIGINT)  # Ctrl+C: Tune stops the running trial and saves the experiment
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    finished = done[0].parent
    before = SimpleNamespace(summary_mtime=done[0].stat().st_mtime_ns, summary=done[0].read_text(),
                             starts=[r for r in history(finished) if r["event"] == "start"],
                             caches=cache_manifests(tmp / "cache"))
    second = run_job("jobs/sweep.py", "--config", str(config))
    return SimpleNamespace(tmp=tmp, folder=folder, first_rc=first.returncode, first_log=(tmp / "first.log").read_text(),
                           second=second, finished=finished, before=before,
                           report=json.loads((folder / "sweep.json").read_text()) if second.returncode == 0 else None)


@pytest.mark.slow
@pytest.mark.timeout(900)  # each of these may be the one that runs the fixture (both sweep runs)
@pytest.mark.e2e
def test_interrupted_sweep_continues_without_redoing_finished_trials(sweep):
    assert sweep.first_rc != 0 and "run the same command again to continue" in sweep.first_log, sweep.first_log[-3000:]
    assert sweep.second.returncode == 0, sweep.second.stdout[-3000:] + sweep.second.stderr[-5000:]
    assert len(sweep.before.starts) == 1
    summary = sweep.finished / "trial.json"
    assert summary.stat().st_mtime_ns == sweep.before.summary_mtime and summary.read_text() == sweep.before.summary
    assert [r for r in history(sweep.finished) if r["event"] == "start"] == sweep.before.starts  # not trained again
    assert (sweep.folder / "run_complete.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_every_trial_is_reported_and_asha_stops_the_diverging_one(sweep):
    assert sweep.report is not None, sweep.second.stderr[-5000:]
    trials = {t["params"]["student"]: t for t in sweep.report["trials"]}
    assert set(trials) == {"l02", "l13", "lr5"}
    assert {t["params"]["train.weight_decay"] for t in trials.values()} == {0.01}
    assert trials["l02"]["status"] == trials["l13"]["status"] == "evaluated"
    stopped = trials["lr5"]
    assert stopped["status"] == "stopped early (ASHA)" and stopped["train"]["step"] < 18
    assert sweep.report["meta"]["placement_groups_left"] == 0  # stopped trials' Train workers released their CPUs
    for trial in (t for t in trials.values() if t["status"] == "evaluated"):
        records = trial["records"]
        assert {(r["dataset"], r["split"]) for r in records} == {("scifact", "train")}  # validation, never test
        assert {r["mode"] for r in records} == {"student", "asymmetric"}
        assert {(r["dims"], r["quantization"], r["bytes_per_vector"]) for r in records
                if r["metric"] == "ndcg_at_10"} == {(32, "float32", 128), (32, "binary", 4), (16, "float32", 64),
                                                   (16, "binary", 2)}
        assert trial["train"]["step"] == 18 and trial["param_counts"]["total"] > 0
        assert sweep.report["throughput"][trial["trial_id"]]["docs_per_s"] > 0
    markdown = (sweep.folder / "sweep.md").read_text()
    assert all(t["trial_id"] in markdown for t in trials.values()) and "stopped early (ASHA)" in markdown


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_the_front_is_correct_and_every_evaluated_student_is_exported_with_test_scores(sweep):
    from sentence_transformers import SentenceTransformer

    points = sweep.report["points"]
    front = [i for i, p in enumerate(points) if p["pareto"]]
    assert front and front == pareto_front(points, maximize=("quality", "speed"), minimize=("bytes_per_vector",))
    def axes(p):  # larger is better on each
        return p["quality"], p["speed"], -p["bytes_per_vector"]

    for p in points:  # brute force: on the front iff no point is at least as good everywhere and not equal
        beaten = any(all(a >= b for a, b in zip(axes(q), axes(p))) and axes(q) != axes(p) for q in points)
        assert p["pareto"] != beaten
    assert (sweep.folder / "pareto.png").stat().st_size > 0
    evaluated = {t["trial_id"] for t in sweep.report["trials"] if t["status"] == "evaluated"}
    assert {p["trial_id"] for p in points if p["pareto"]} <= evaluated == set(sweep.report["test"])  # test_scores: all
    assert sweep.report["meta"]["tested_students"] == len(evaluated) == 2
    for trial_id in evaluated:
        out = sweep.folder / "pareto" / trial_id
        assert SentenceTransformer(str(out / "student"), device="cpu").encode(["gene study"]).shape == (1, 32)
        manifest = json.loads((out / "student" / "leaf_manifest.json").read_text())
        assert manifest["results"]["trial"] == trial_id and manifest["results"]["headline"]
        records = json.loads((out / "results.json").read_text())["records"]
        assert {r["split"] for r in records} == {"test"} and (out / "results.md").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_the_teacher_ran_before_the_trials_and_never_during_them(sweep):
    after = cache_manifests(sweep.tmp / "cache")
    # the text mix and the validation queries and corpus (one stage), cached before the first run's tuner started
    assert len(sweep.before.caches) == 2 and all(m["complete"] for m in sweep.before.caches.values())
    mix = max(sweep.before.caches.values(), key=lambda m: m["rows"])
    assert mix["last_run"]["rows_computed"] == mix["rows"] and mix["last_run"]["chunks_reused"] == 0  # one pass
    for path, manifest in sweep.before.caches.items():
        assert after[path] == manifest  # ... and never computed again, by the trials or by the restarted sweep
    trial_dirs = [p.parent for p in sweep.folder.glob("trials/*/metrics.jsonl")]
    tuning = (min(history(d)[0]["time"] for d in trial_dirs), max(history(d)[-1]["time"] for d in trial_dirs))
    assert not [m for m in after.values() if tuning[0] <= m["finished"] <= tuning[1]]
    assert len(after) == 3  # + the test split's queries and corpus, for the final report of the front


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_each_trial_is_an_mlflow_run_nested_under_the_sweep(sweep):
    from mlflow.tracking import MlflowClient

    from tests.test_tracking import assert_tracked_as_logged

    assert sweep.report is not None, sweep.second.stderr[-5000:]
    client = MlflowClient(f"sqlite:///{sweep.tmp / 'runs' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("leaf-ray").experiment_id])}
    assert (sweep.tmp / "runs" / "mlflow-artifacts").is_dir()  # beside the store, though the trials name its URI
    parent = runs.pop(SWEEP)
    assert parent.info.status == "FINISHED" and parent.data.metrics["evaluated"] == 2
    trials = {t["trial_id"]: t for t in sweep.report["trials"]}
    assert set(runs) == set(trials)  # one run per trial, the interrupted and resumed one included
    for trial_id, run in runs.items():
        trial = trials[trial_id]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == ("FINISHED" if trial["status"] == "evaluated" else "KILLED")
        lr = {"lr5": 5.0, "l13": 1e-5}.get(trial["params"]["student"], 1e-3)
        assert run.data.params["train.lr"] == json.dumps(lr)
        # the trial the first run's SIGINT cut off, and the one ASHA stopped, were each killed once mid-training
        kills = 0 if sweep.folder / "trials" / trial_id == sweep.finished else 1
        assert_tracked_as_logged(client, run.info.run_id, sweep.folder / "trials" / trial_id / "metrics.jsonl", kills)
        if trial["status"] == "evaluated":  # the validation scores the sweep ranked it by
            for mode in TRIAL_MODES:
                assert run.data.metrics[f"val_ndcg_at_10_{mode}"] == mean_metric(trial["records"], mode, "ndcg_at_10")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_the_ablation_table_of_a_sweep(sweep):
    ablations = load_script("bench/ablations.py")
    config = yaml.safe_load((sweep.tmp / "tiny.yaml").read_text())
    result = ablations.summarize(sweep.report, config, "python jobs/sweep.py --config config.yaml")
    rows = {row["arm"]: row for row in result["rows"]}
    assert set(rows) == set(config["sweep"]["students"]) == {"l02", "l13", "lr5"}
    evaluated = [row for row in rows.values() if row["status"] == "evaluated"]
    assert result["chosen_on_validation"] == max(evaluated, key=lambda r: r["validation_asymmetric_ndcg_at_10"])["arm"]
    for row in evaluated:
        trial = next(t for t in sweep.report["trials"] if t["trial_id"] == row["trial_id"])
        assert row["val_cosine"] == trial["train"]["val_cosine"] and row["steps"] == 18 and row["train_seconds"] > 0
        assert 0 < row["test_standard_ndcg_at_10"] <= 1 and 0 < row["test_asymmetric_ndcg_at_10"] <= 1
    assert rows["lr5"]["test_standard_ndcg_at_10"] is None  # stopped by ASHA: never scored on test
    assert 0 < result["teacher"]["test_ndcg_at_10"] <= 1 and 0 < result["teacher"]["validation_ndcg_at_10"] <= 1
