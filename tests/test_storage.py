"""Storage on object stores, against a real S3-compatible server (moto's) on 127.0.0.1: the teacher cache, the
run folder, Ray Train checkpoints and the report in a bucket; clear up-front errors for unusable roots; and
training placed on an accelerator pool (`train.accelerator_type`) of a local Ray cluster that advertises it.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.fs as pafs
import pytest

from leaf_ray.config import (
    ConfigError,
    RunConfig,
    StorageConfig,
    StudentConfig,
    TrainConfig,
    load_config,
)
from leaf_ray.runs import RunFinishedError, RunFolder
from leaf_ray.runtime import free_ports
from leaf_ray.storage import StorageError, local_copy, parse_root, resolve
from tests.conftest import S3_SECRET as SECRET
from tests.conftest import run_in_process, text_rows, tiny_teacher_config
from tests.test_distill import tiny_run_config

BUCKET = "leaf-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with one bucket; the credentials are only in the environment
    (tests/conftest.py sets them before the session's Ray starts, so its workers and job subprocesses have them)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_ports(1)[0], verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield SimpleNamespace(endpoint=f"http://{host}:{port}", fs=fs)
    finally:
        server.stop()


def objects(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """Files under bucket/prefix (relative name -> size)."""
    root = f"{BUCKET}/{prefix}".rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{root}/"): i.size for i in infos if i.type == pafs.FileType.File}


def assert_no_secret(fs: pafs.FileSystem, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text
    for name in objects(fs, ""):
        with fs.open_input_stream(f"{BUCKET}/{name}") as stream:
            assert SECRET.encode() not in stream.read(), f"{name} holds the secret key"


# -- roots and up-front errors (no server needed) -------------------------------------------------------

def test_roots_parse_and_unusable_ones_name_the_field(tmp_path, monkeypatch):
    assert parse_root("s3://bucket/a/b/", "f") == ("s3", "bucket/a/b")
    assert parse_root("gs://bucket", "f") == ("gs", "bucket")
    assert parse_root("file:///data/x", "f") == ("", "/data/x")
    monkeypatch.chdir(tmp_path)
    local = resolve("runs", "storage.runs_root")
    assert local.is_local and local.native() == tmp_path / "runs" and resolve(tmp_path).native() == tmp_path
    with pytest.raises(StorageError, match=r"storage.runs_root: unsupported storage scheme 'hdfs'"):
        resolve("hdfs://namenode/runs", "storage.runs_root")
    with pytest.raises(StorageError, match="storage.cache_root: credentials") as err:
        parse_root(f"s3://AKIAX:{SECRET}@bucket/x", "storage.cache_root")
    assert SECRET not in str(err.value)
    with pytest.raises(ConfigError, match="storage.runs_root: unsupported storage scheme 'ftp'"):
        load_config(None, ["storage.runs_root=ftp://host/runs"])
    with pytest.raises(ConfigError) as err:  # a config error never echoes a URI with credentials either
        load_config(None, [f"storage.cache_root=s3://AKIAX:{SECRET}@bucket/x"])
    assert "storage.cache_root" in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(ConfigError, match="storage.local_cache must be a local directory"):
        load_config(None, ["storage.local_cache=s3://bucket/models"])
    storage = StorageConfig(cache_root="s3://bucket/cache", runs_root="gs://bucket/runs")
    assert storage.local_cache_path() == Path("~/.cache/leaf-ray").expanduser()  # models stay on local disk
    with pytest.raises(ConfigError, match="storage.cache_root: 's3://bucket/cache' is an object store"):
        storage.cache_path()


# -- everything on S3 ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_distill_job_keeps_cache_checkpoints_student_and_report_in_the_bucket(s3, ray_local, tiny_teacher, tmp_path,
                                                                               capfd):
    from sentence_transformers import SentenceTransformer

    config = tiny_run_config(tmp_path, tiny_teacher)
    storage = [f"storage.cache_root=s3://{BUCKET}/job/cache", f"storage.runs_root=s3://{BUCKET}/job/runs",
               f"storage.endpoint_override={s3.endpoint}", f"storage.local_cache={tmp_path / 'local'}"]
    lighter = ["train.epochs=1", "train.checkpoint_every_steps=5", "evaluate.sts=null",
               "evaluate.quantizations=[float32]"]
    _, printed = run_in_process("jobs/distill.py", "--config", str(config), *storage, *lighter)
    assert f"[leaf] student:  s3://{BUCKET}/job/runs/tiny/student" in printed

    run = objects(s3.fs, "job/runs/tiny")
    for name in ("student/model.safetensors", "student/leaf_manifest.json", "student/modules.json",
                 "init_student/leaf_manifest.json", "results.json", "results.md", "run_complete.json",
                 "metrics.jsonl", "plots/scifact_test_ndcg_at_10.png"):
        assert run.get(name, 0) > 0, f"{name} missing from the bucket: {sorted(run)}"
    checkpoints = {name.split("/")[0] for name in run if name.startswith("checkpoint_") and "/" in name}
    assert checkpoints and all(f"{c}/train_state.json" in run and f"{c}/model.safetensors" in run for c in checkpoints)
    results = json.loads(resolve(f"s3://{BUCKET}/job/runs/tiny/results.json", "", s3.endpoint).read_text())
    assert {("scifact", "student"), ("scifact", "asymmetric")} <= {(r["dataset"], r["mode"]) for r in results["records"]}
    caches = objects(s3.fs, "job/cache/teacher")
    manifests = [json.loads(resolve(f"s3://{BUCKET}/job/cache/teacher/{m}", "", s3.endpoint).read_text())
                 for m in caches if m.endswith("manifest.json")]
    assert manifests and all(m["complete"] for m in manifests)
    assert sum(m["rows"] for m in manifests) >= 320  # the train mix plus the evaluation corpora's teacher vectors

    # the student in the bucket loads as a plain sentence-transformers model, results in its manifest
    with local_copy(resolve(f"s3://{BUCKET}/job/runs/tiny/student", "", s3.endpoint)) as student:
        assert SentenceTransformer(str(student), device="cpu").encode(["gene study"]).shape == (1, 32)
        assert json.loads((student / "leaf_manifest.json").read_text())["results"]["headline"]
    assert not (tmp_path / "runs").exists() and not (Path.cwd() / "s3:").exists()  # nothing went to local disk
    assert list((tmp_path / "local" / "runs").glob("*/tiny/student/model.safetensors"))  # but the working copy
    assert_no_secret(s3.fs, printed, *capfd.readouterr())

    with pytest.raises(RunFinishedError, match=f"already finished at s3://{BUCKET}/job/runs/tiny"):
        run_in_process("jobs/distill.py", "--config", str(config), *storage)


def test_unusable_buckets_fail_up_front_naming_the_field(s3, tmp_path):
    def folder(**storage) -> RunFolder:
        storage = {"cache_root": f"s3://{BUCKET}/cache", "runs_root": f"s3://{BUCKET}/runs",
                   "endpoint_override": s3.endpoint, "local_cache": str(tmp_path / "local"), **storage}
        return RunFolder(RunConfig(name="probe", storage=StorageConfig(**storage)))

    folder().check_writable()
    assert objects(s3.fs, "runs") == {} and objects(s3.fs, "cache") == {}  # the probes are gone
    with pytest.raises(StorageError, match=r"storage.runs_root: s3://no-such-bucket/runs/probe is not writable.*"
                                           r"(?i:bucket)"):
        folder(runs_root="s3://no-such-bucket/runs").check_writable()
    with pytest.raises(StorageError, match="storage.cache_root: s3://no-such-bucket/cache is not writable"):
        folder(cache_root="s3://no-such-bucket/cache").check_writable()
    started = time.perf_counter()
    with pytest.raises(StorageError, match="storage.runs_root: .* not writable"):
        folder(endpoint_override=f"http://127.0.0.1:{free_ports(1)[0]}").check_writable()  # nothing listens there
    assert time.perf_counter() - started < 60


def test_storage_paths_read_write_and_copy_on_s3(s3, tmp_path):
    root = resolve(f"s3://{BUCKET}/paths", "test", s3.endpoint)
    (root / "a.json").write_text('{"x": 1}')
    (root / "log.jsonl").append_text("1\n")
    (root / "log.jsonl").append_text("2\n")
    assert json.loads((root / "a.json").read_text()) == {"x": 1} and (root / "log.jsonl").read_text() == "1\n2\n"
    source = tmp_path / "dir"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "b.txt").write_text("b")
    (root / "dir").upload(source)
    (source / "sub" / "b.txt").unlink()
    (source / "c.txt").write_text("c")
    (root / "dir").upload(source)  # a directory upload replaces the old contents
    assert sorted(objects(s3.fs, "paths/dir")) == ["c.txt"]
    with local_copy(root / "dir") as copy:
        assert (copy / "c.txt").read_text() == "c"
    shipped = pickle.dumps(root)  # what Ray workers get: the endpoint, never the credentials
    assert pickle.loads(shipped).at(f"{BUCKET}/paths/a.json").read_text() == '{"x": 1}'
    assert SECRET.encode() not in shipped
    (root / "dir").delete()
    assert not (root / "dir").exists() and (root / "a.json").is_file()


@pytest.mark.timeout(600)
@pytest.mark.e2e
def test_teacher_cache_in_s3_is_reused_and_resumed(s3, ray_local, tiny_teacher, tmp_path):
    from leaf_ray.models import ModelStore
    from leaf_ray.teacher import TeacherCache, build_cache

    cfg = tiny_teacher_config(tiny_teacher, chunk_rows=64, num_cpus_per_actor=0.5, torch_threads=1)
    table = text_rows(300, seed=5)  # 8 chunks: 300 / 64 rows, up to a power of two
    root = resolve(f"s3://{BUCKET}/cache", "storage.cache_root", s3.endpoint)
    cache = build_cache(table, cfg, root, ModelStore(tmp_path / "models"))
    assert str(cache.path).startswith(f"s3://{BUCKET}/cache/teacher/")
    assert cache.manifest["last_run"]["chunks_computed"] == 8
    prefix = cache.location.path.removeprefix(f"{BUCKET}/")
    assert sorted(objects(s3.fs, prefix)) == ["manifest.json", *[f"part-{i:05d}.parquet" for i in range(8)]]
    local = build_cache(table, cfg, tmp_path / "local-cache")
    np.testing.assert_array_equal(cache.embeddings(), local.embeddings())  # same bytes wherever the cache lives

    finished = cache.manifest["finished"]
    reused = build_cache(table, cfg, root, ModelStore(tmp_path / "models"))
    assert reused.manifest["finished"] == finished  # complete: returned as it is, nothing recomputed

    # An interrupted run: part 2 never written, part 3 cut off mid-write, the manifest not marked complete.
    s3.fs.delete_file(f"{BUCKET}/{prefix}/part-00002.parquet")
    part3 = cache.part_location(3).read_bytes()
    cache.part_location(3).write_bytes(part3[: len(part3) // 2])
    manifest = json.loads((cache.location / "manifest.json").read_text())
    (cache.location / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    resumed = build_cache(table, cfg, root, ModelStore(tmp_path / "models"))
    run = resumed.manifest["last_run"]
    assert (run["chunks_computed"], run["rows_computed"], run["chunks_reused"]) == (
        2, resumed.chunk_rows_of(2) + resumed.chunk_rows_of(3), 6)
    np.testing.assert_array_equal(resumed.embeddings(), local.embeddings())
    ds = TeacherCache.load(cache.location).dataset()
    batch = ds.take_batch(300, batch_format="numpy")  # Ray Data reads the parts from the bucket in its workers
    assert batch["embedding"].shape == (300, local.dim) and sorted(batch["id"]) == sorted(table.column("id").to_pylist())


@pytest.mark.timeout(600)
@pytest.mark.e2e
def test_training_on_an_a100_pool_keeps_checkpoints_in_s3_and_resumes_from_them(s3, ray_local, tiny_teacher,
                                                                                 tiny_cache, tmp_path):
    from ray.util import placement_group_table

    from leaf_ray.inputs import TrainingInputs, split_table
    from leaf_ray.student import load_student
    from leaf_ray.train import train_student

    def config(max_steps: int) -> RunConfig:
        return RunConfig(
            name="a100", teacher=tiny_teacher_config(tiny_teacher),
            student=StudentConfig(kind="teacher_layers", layers=[0, 2], max_length=64, projection_init="random"),
            train=TrainConfig(batch_size=16, lr=1e-3, epochs=1, max_steps=max_steps, num_workers=1,
                              cpus_per_worker=0.5, torch_threads=1, log_every_steps=2, checkpoint_every_steps=3,
                              accelerator_type="A100", resources_per_worker={"train_pool": 1}),
            storage=StorageConfig(cache_root=str(tmp_path / "cache"), runs_root=f"s3://{BUCKET}/train-runs",
                                  endpoint_override=s3.endpoint, local_cache=str(tmp_path / "local")))

    inputs = TrainingInputs.in_memory(*split_table(tiny_cache, 48, seed=0), teacher_dim=32)
    first = train_student(config(6), inputs)
    assert first.steps == 6 and first.checkpoint_path.startswith(f"s3://{BUCKET}/train-runs/a100/checkpoint_")
    # Ray placed the worker with the accelerator constraint and the pool resource (kept in GCS after removal)
    bundles = [b for pg in placement_group_table().values() for b in pg["bundles"].values()]
    assert any(b.get("accelerator_type:A100", 0) > 0 and b.get("train_pool") == 1 for b in bundles), bundles
    stored = objects(s3.fs, "train-runs/a100")
    assert {"student/model.safetensors", "student/leaf_manifest.json", "init_student/model.safetensors",
            "metrics.jsonl"} <= set(stored)
    assert len({n.split("/")[0] for n in stored if n.startswith("checkpoint_") and "/" in n}) == 2  # steps 3, 6
    assert first.history() == [json.loads(line) for line in
                                resolve(f"s3://{BUCKET}/train-runs/a100/metrics.jsonl", "", s3.endpoint)
                                .read_text().splitlines()]
    assert load_student(first.student_path).encode(["gene"]).shape == (1, 32)

    # a spot interruption: a new driver (here: a new call) resumes from the checkpoint in the bucket
    second = train_student(config(9), inputs)
    assert second.start["resumed"] and second.start["step"] == 6 and second.steps == 9
    assert_no_secret(s3.fs)
