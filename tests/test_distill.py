"""jobs/distill.py end to end on tiny models and real data: in this process on the session's Ray, and through
`ray job submit` against a head of its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from leaf_ray.data.hub import HubPath
from leaf_ray.runs import RunFinishedError
from tests.conftest import DATA_ROOT, REPO, hub_snapshot, load_script, random_texts, run_in_process

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]


def tiny_run_config(tmp: Path, teacher: Path, name: str = "tiny", tracking: bool = False) -> Path:
    texts = tmp / "texts.jsonl"
    with texts.open("w") as out:
        for i, text in enumerate(random_texts(320, seed=11)):
            out.write(json.dumps({"id": f"t{i}", "text": text, "kind": "query" if i % 4 else "document"}) + "\n")
    config = {
        "name": name,
        "data": {"root": str(DATA_ROOT), "validation_size": 32, "sources": [{"path": str(texts)}]},
        "teacher": {"model": str(teacher), "max_length": 64, "batch_size": 32, "chunk_rows": 128,
                    "num_cpus_per_actor": 0.5, "torch_threads": 1, "cache_dtype": "float16"},
        "student": {"kind": "teacher_layers", "layers": [0, 2], "max_length": 64},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-4, "num_workers": 1, "cpus_per_worker": 0.5,
                  "torch_threads": 1},
        "evaluate": {"datasets": ["scifact"], "sts": "stsbenchmark", "dims": [16], "max_corpus": 300,
                     "max_queries": 40, "quantizations": ["float32", "int8", "binary"],
                     "throughput_samples": 16},
        "ray": {"num_cpus": 2},
        "storage": {"cache_root": str(tmp / "cache"), "runs_root": str(tmp / "runs")},
        "tracking": {"mlflow": tracking},  # the default store: <runs_root>/mlflow.db
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_job(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="module")
def finished_run(ray_local, tiny_teacher, tmp_path_factory):
    """The job run once in this process on the session's Ray; the tests below only read what it left."""
    tmp = tmp_path_factory.mktemp("distill")
    config = tiny_run_config(tmp, tiny_teacher, tracking=True)
    _, printed = run_in_process("jobs/distill.py", "--config", str(config))
    return tmp, config, printed


def test_distill_produces_a_loadable_student_results_and_plots(finished_run):
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer

    tmp, _, printed = finished_run
    run = tmp / "runs" / "tiny"
    student = SentenceTransformer(str(run / "student"), device="cpu")
    assert student.encode(["gene study"]).shape == (1, 32)  # the teacher's dimension
    results = json.loads((run / "results.json").read_text())
    records = results["records"]
    modes = {(r["dataset"], r["mode"]) for r in records}
    assert {("scifact", "teacher"), ("scifact", "student"), ("scifact", "asymmetric")} <= modes
    assert {r["dims"] for r in records if r["dataset"] == "scifact"} == {32, 16}
    assert {r["quantization"] for r in records} == {"float32", "int8", "binary"}
    assert any(r["metric"] == "overlap_at_10" for r in records)
    assert any(r["dataset"] == "stsbenchmark" for r in records)
    meta = results["meta"]
    assert set(meta["stage_seconds"]) == {"teacher", "train", "evaluate", "throughput"}
    assert meta["params"]["total"] > 0 and meta["throughput"]["student"]["docs_per_s"] > 0
    assert list(run.glob("plots/*.png")) and (run / "results.md").is_file()
    manifest = json.loads((run / "student" / "leaf_manifest.json").read_text())
    assert manifest["results"]["headline"]
    card = ModelCard.load(run / "student" / "README.md")  # the model card, generated from the run's results
    assert card.data.library_name == "sentence-transformers" and card.data.eval_results
    assert "[leaf] report:" in printed and "scifact/test ndcg_at_10" in printed
    # the config's float16 cache: half-precision parts, read back for training and validation; the student ends
    # aligned with those vectors (its teacher-layer init starts there, so alignment, not a falling loss, is the check)
    parts = list((tmp / "cache" / "teacher").rglob("part-*.parquet"))
    assert parts and {pq.read_schema(p).field("embedding").type.value_type for p in parts} == {pa.float16()}
    end = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["val_cosine"] > 0.99


def test_the_run_is_tracked_in_mlflow_as_its_metrics_log_says(finished_run):
    from mlflow.tracking import MlflowClient

    from tests.test_tracking import assert_tracked_as_logged

    tmp, config, printed = finished_run
    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("leaf-ray").experiment_id])
    assert logged.info.status == "FINISHED" and f"MLflow: run {logged.info.run_id}" in printed
    assert_tracked_as_logged(client, logged.info.run_id, tmp / "runs" / "tiny" / "metrics.jsonl")
    assert logged.data.params["train.epochs"] == "2" and logged.data.params["name"] == "tiny"
    results = json.loads((tmp / "runs" / "tiny" / "results.json").read_text())
    headline = next(r for r in results["records"] if (r["dataset"], r["mode"], r["metric"], r["dims"],
                                                      r["quantization"]) == ("scifact", "student", "ndcg_at_10",
                                                                             32, "float32"))
    assert logged.data.metrics["scifact.test.ndcg_at_10.student"] == headline["value"]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"config.json", "results.json", "student"} <= artifacts


def test_compare_runs_finds_a_run_equal_to_itself_and_names_what_moved(finished_run, tmp_path):
    tmp, _, _ = finished_run
    results = tmp / "runs" / "tiny" / "results.json"
    same, _ = run_in_process("bench/compare_runs.py", str(results), str(results), "--out", str(tmp_path / "same.json"))
    assert same["compared"] > 20 and same["differ"] == {} and same["max_abs_diff"] == 0.0
    changed = json.loads(results.read_text())
    dropped = changed["records"].pop()
    changed["records"][0]["value"] += 1e-3
    changed["meta"]["train"]["val_cosine"] += 1e-7  # within the tolerance: float summation order
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit) as exited:
        run_in_process("bench/compare_runs.py", str(results), str(tmp_path / "changed.json"),
                       "--out", str(tmp_path / "changed-report.json"))
    assert exited.value.code == 1
    report = json.loads((tmp_path / "changed-report.json").read_text())
    name = "/".join(str(changed["records"][0][k]) for k in load_script("bench/compare_runs.py").RECORD_KEY)
    assert list(report["differ"]) == [name] and len(report["only_in_a"]) == 1
    assert report["only_in_a"][0].endswith(f"/{dropped['quantization']}/{dropped['metric']}")
    assert report["max_abs_diff"] == pytest.approx(1e-3)


def test_rerun_refuses_finished_run_and_new_name_reuses_cache(finished_run):
    tmp, config, _ = finished_run
    manifests = list((tmp / "cache" / "teacher").rglob("manifest.json"))
    before = {p: json.loads(p.read_text())["finished"] for p in manifests}
    with pytest.raises(RunFinishedError, match="already finished"):
        run_in_process("jobs/distill.py", "--config", str(config))
    assert (tmp / "runs" / "tiny" / "run_complete.json").is_file()
    run_in_process("jobs/distill.py", "--config", str(config), "name=tiny-2", "train.max_steps=2", "evaluate.sts=null",
                   "evaluate.quantizations=[float32]", "evaluate.max_corpus=60", "evaluate.max_queries=10")
    assert (tmp / "runs" / "tiny-2" / "run_complete.json").is_file()
    after = {p: json.loads(p.read_text())["finished"] for p in manifests}
    assert after == before, "the teacher cache was recomputed"


def test_the_scaling_curve_grows_one_teacher_cache_and_fits_its_points(finished_run, tmp_path):
    """bench/scaling.py: each point a distill run, the larger point copying the smaller one's teacher vectors (its
    mix holds them: seeded limits nest) instead of embedding them again; a trend line through the points."""
    import ray

    _, config, _ = finished_run
    curve, _ = run_in_process(  # the point jobs join the session's Ray instead of starting their own
        "bench/scaling.py", "--config", str(config), "--texts", "96", "192", "--name", "curve",
        f"ray.address={ray.get_runtime_context().gcs_address}",
        "--out", str(tmp_path / "curve.json"), "data.sources.0.limit_queries=240", "data.sources.0.limit_documents=80",
        f"storage.cache_root={tmp_path / 'cache'}", f"storage.runs_root={tmp_path / 'runs'}", "train.epochs=1",
        "evaluate.sts=null", "evaluate.quantizations=[float32]", "evaluate.max_corpus=60", "evaluate.max_queries=10")
    small, large = curve["points"]
    assert (small["texts"], large["texts"]) == (96, 192) and large["train_samples"] > small["train_samples"]
    assert all(0 < p["standard_retention"] and 0 < p["asymmetric_retention"] for p in curve["points"])
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "teacher").rglob("manifest.json")]
    copied = {m["rows"]: m["last_run"]["rows_copied"] for m in manifests if m["rows"] in (96, 192)}
    assert copied == {96: 0, 192: 96}
    assert curve["trend_vs_log10_samples"]["standard"] is not None and (tmp_path / "curve.png").is_file()
    assert json.loads((tmp_path / "curve.json").read_text())["points"][1]["command"].startswith("python jobs/distill.py")


def test_ray_job_submit_against_a_local_head(finished_run, tiny_teacher, tmp_path):
    """The README's `ray job submit` flow against a head started on 127.0.0.1 and stopped after (bench/job_log.py's,
    which also measures a submitted job's log). The job finds the text mix's teacher vectors that the in-process
    run left in the same cache root, as a user's job after a trial run does; its evaluation set is new, so one
    teacher actor pool still runs inside the submitted job."""
    job_log = load_script("bench/job_log.py")
    shared_cache = finished_run[0] / "cache"
    manifests = {p: p.read_text() for p in (shared_cache / "teacher").rglob("manifest.json")}
    config = tiny_run_config(tmp_path, tiny_teacher, name="submitted")
    log = tmp_path / "job.log"
    entrypoint = ["python", "jobs/distill.py", "--config", str(config), f"storage.cache_root={shared_cache}",
                  # the whole job, kept small: the in-process run above covers what each stage produces; 12
                  # queries, not the rerun test's 10, so that the evaluation set is one no run has cached yet
                  "train.max_steps=4", "evaluate.sts=null", "evaluate.quantizations=[float32]",
                  "evaluate.max_corpus=60", "evaluate.max_queries=12"]
    with job_log.local_head() as address:
        status = job_log.submit(address, REPO, entrypoint, {"LEAF_DATA_DIR": str(DATA_ROOT), "HF_HUB_OFFLINE": "1"},
                                log, timeout_s=800)
    printed = log.read_text()
    assert status == 0 and "succeeded" in printed, printed[-6000:]
    assert "Started a local Ray instance" not in printed  # it joined the cluster
    run = tmp_path / "runs" / "submitted"
    assert (run / "student" / "leaf_manifest.json").is_file() and (run / "results.json").is_file()
    counts = job_log.count_lines(printed, minutes=1.0)
    assert counts["ray_data_progress_lines"] == 0, printed[-6000:]  # no terminal: Ray Data's blocks are off
    bars = ("Loading weights", "Writing model shards", "Batches:", "retrieval variants")  # libraries' and ours
    assert not [bar for bar in bars if bar in printed], printed[-6000:]  # no tqdm bar in a log, from any process
    after = {p: p.read_text() for p in (shared_cache / "teacher").rglob("manifest.json")}
    assert {p: after[p] for p in manifests} == manifests  # the mix's vectors were reused, not recomputed
    (evaluation,) = (json.loads(after[p]) for p in set(after) - set(manifests))  # the new evaluation set's cache
    assert evaluation["complete"] and evaluation["last_run"]["rows_computed"] == evaluation["rows"]


def hub_layout_file(pattern: str) -> str:
    """A file name the config's glob pattern matches: a class `[0-2]` becomes its first member, `*` a shard name."""
    return re.sub(r"\[(.)[^]]*\]", r"\1", pattern).replace("*", "00000-of-00001")


def test_the_paper_recipe_runs_end_to_end_from_a_cache_laid_out_like_the_hub(ray_local, tiny_teacher, tmp_path,
                                                                              monkeypatch):
    """configs/leaf-ir-paper.yaml as it is (its hf:// sources, id-less and integer-id parquet, cyclic schedule with
    a floor, float16 cache), shrunk by overrides to tiny models and 30 rows per source, with every source's
    dataset in a Hugging Face cache laid out as the Hub's (offline): the job reads, trains and evaluates."""
    import huggingface_hub.constants

    config = yaml.safe_load((REPO / "configs" / "leaf-ir-paper.yaml").read_text())
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    texts = iter(random_texts(60 * len(config["data"]["sources"]), seed=5))
    for source in config["data"]["sources"]:
        hub = HubPath.parse(source["path"])
        file = hub_snapshot(cache, hub.repo_id, hub.revision) / hub_layout_file(hub.path)
        file.parent.mkdir(parents=True, exist_ok=True)
        columns = {source.get("text_field", "text"): [f"{next(texts)} {source['name']} {i}" for i in range(60)]}
        if source.get("id_field", "id") is not None:  # msmarco and pubmedqa ids are integers, as on the Hub
            ids = list(range(60)) if source.get("id_field") in ("query_id", "pubid") else [f"x{i}" for i in range(60)]
            columns[source.get("id_field", "id")] = ids
        pq.write_table(pa.table(columns), file)
    overrides = [f"data.sources.{i}.limit=30" for i in range(len(config["data"]["sources"]))] + [
        f"data.root={DATA_ROOT}", "data.validation_size=16",
        f"teacher.model={tiny_teacher}", "teacher.dtype=auto", "teacher.num_gpus_per_actor=0",
        "teacher.accelerator_type=null", "teacher.num_cpus_per_actor=0.5", "teacher.max_actors=1",
        "teacher.torch_threads=1", "teacher.max_length=64", "teacher.batch_size=32", "teacher.chunk_rows=64",
        "student.kind=teacher_layers", "student.layers=[0,1]", "student.max_length=64",
        "train.epochs=3", "train.batch_size=16", "train.gpus_per_worker=0", "train.accelerator_type=null",
        "train.cpus_per_worker=0.5", "train.torch_threads=1", "train.validate_every_steps=null",
        "train.checkpoint_every_steps=null", "train.max_failures=0", "train.log_every_steps=1",
        "evaluate.sts=null", "evaluate.dims=[16]", "evaluate.quantizations=[float32]", "evaluate.max_corpus=60",
        "evaluate.max_queries=10", "evaluate.throughput_samples=0", "evaluate.batch_size=32", "ray.num_cpus=2",
        f"storage.cache_root={tmp_path / 'cache'}", f"storage.runs_root={tmp_path / 'runs'}"]
    summary, _ = run_in_process("jobs/distill.py", "--config", "configs/leaf-ir-paper.yaml", *overrides)

    mix = summary["text_mix"]
    assert mix["read"] == {source["name"]: 60 for source in config["data"]["sources"]}
    assert mix["kept"] == {"document": 60, "query": 120}
    run = tmp_path / "runs" / "leaf-ir-paper"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [s["lr"] for s in steps if s.get("event") == "log"]
    rises = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1]]  # the logged LR decays, restarting twice
    assert len(rises) >= 2 and rises[1] - rises[0] == len(lrs) // 3  # cycles of one epoch (the last log may
    # already show the next cycle's peak: each log shows the LR of the step after it)
    assert max(lrs) <= 1e-4 * (1 + 1e-6) and 1e-5 * (1 - 1e-6) <= min(lrs) < 0.3 * max(lrs)  # 1e-4 -> 1e-5
    assert (run / "run_complete.json").is_file()
    ids = pa.concat_tables(pq.read_table(p, columns=["id"]) for p in (tmp_path / "cache" / "teacher").rglob(
        "part-*.parquet"))["id"].to_pylist()
    assert any(i.startswith("cc-news:") for i in ids) and any(i.startswith("amazon-qa:") for i in ids)
