"""Reliability under injected faults and bad input (issue 9), on real local Ray with tiny real models.

Faults are real: worker processes are SIGKILLed, job drivers get SIGINT/SIGTERM, cache files are damaged on
disk, teachers are real models with broken weights or configs. Only this test process's own Ray processes
are ever signalled (found among its descendants, never by name across the machine).

Covered elsewhere and not repeated here: a SIGKILLed teacher-stage driver and a truncated cache part
(test_teacher_stage), resume at the exact step (test_train), bad JSONL lines / missing fields / duplicate ids /
empty texts in the mix / missing data paths (test_data), remote code and pickle-only models and unknown model
ids (test_models), unknown config keys and wrong types (test_config), qrels naming unknown ids (test_evaluate),
API keys in stage logs and errors (test_teacher_backends), unusable object-store roots (test_storage).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from leaf_ray.config import TeacherConfig, load_config, with_values
from leaf_ray.data import build_mix
from leaf_ray.hashing import chunk_of
from leaf_ray.inputs import collect, training_inputs
from leaf_ray.storage import StorageError
from leaf_ray.teacher import CacheMismatchError, build_cache
from leaf_ray.teacher.cache import MANIFEST, CacheDamagedError, TeacherCache
from leaf_ray.teacher.chunks import plan_table
from leaf_ray.teacher.stage import cache_path_for
from leaf_ray.train import train_student
from tests.conftest import DATA_ROOT, REPO, build_tiny_bert, random_texts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]  # faults injected into real runs

TEXTS, CHUNK = 2000, 40  # 50 cache chunks
STEPS, CHECKPOINT_EVERY = 60, 10


# -- the module's run: a tiny config on disk, shared by the jobs and the in-process runs ------------------

@pytest.fixture(scope="module")
def job(tiny_teacher, tmp_path_factory) -> SimpleNamespace:
    """A job config and its mix: the teacher runs 8 rows per actor call, so a stage lasts long enough to be
    interrupted; training reports only with its checkpoints, since each report waits for Ray Train's controller
    to poll (every 2 s)."""
    tmp = tmp_path_factory.mktemp("reliability")
    with (tmp / "texts.jsonl").open("w") as out:
        for i, text in enumerate(random_texts(TEXTS, seed=21)):
            out.write(json.dumps({"id": f"t{i}", "text": text, "kind": "document" if i % 4 == 0 else "query"}) + "\n")
    tree = {
        "name": "reference",
        "data": {"root": str(DATA_ROOT), "validation_size": 64, "dedupe_texts": False,
                 "sources": [{"path": str(tmp / "texts.jsonl")}]},
        "teacher": {"model": str(tiny_teacher), "max_length": 64, "batch_size": 2, "chunk_rows": CHUNK,
                    "num_cpus_per_actor": 0.5, "torch_threads": 1},
        "student": {"kind": "teacher_layers", "layers": [0, 2], "max_length": 64, "projection_init": "random"},
        "train": {"max_steps": STEPS, "batch_size": 16, "lr": 1e-3, "num_workers": 1, "cpus_per_worker": 0.5,
                  "torch_threads": 1, "checkpoint_every_steps": CHECKPOINT_EVERY, "log_every_steps": 10 * STEPS},
        "ray": {"num_cpus": 2},
        "storage": {"cache_root": str(tmp / "cache"), "runs_root": str(tmp / "runs")},
    }
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(tree))
    texts, _ = build_mix(load_config(config).data)
    table = collect(texts)
    assert len(table) == TEXTS
    return SimpleNamespace(tmp=tmp, config=config, texts=texts, table=table)


def where(tmp: Path, name: str) -> list[str]:
    """Overrides that give a run its own name, cache root and runs root (the same in a job and in-process)."""
    return [f"name={name}", f"storage.cache_root={tmp / 'cache'}", f"storage.runs_root={tmp / 'runs'}"]


@pytest.fixture(scope="module")
def reference(ray_local, job) -> SimpleNamespace:
    """The undisturbed run every faulted one is compared with: its teacher cache and trained student."""
    cfg = load_config(job.config)
    inputs = training_inputs(cfg, job.texts)
    result = train_student(cfg, inputs)
    history = result.history()
    assert result.steps == STEPS and history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]  # it learns
    cache = build_cache(job.texts, cfg.teacher, cfg.storage.cache_location())  # complete: only opened
    return SimpleNamespace(cfg=cfg, result=result, cache=cache, vectors=cache.embeddings(),
                           cache_root=Path(cfg.storage.cache_root))


def assert_same_cache(cache: TeacherCache, reference: SimpleNamespace) -> None:
    """Every input id exactly once, in the same parts and order, with the undisturbed run's vectors."""
    ids = cache.read_table(["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == TEXTS
    assert ids == reference.cache.read_table(["id"]).column("id").to_pylist()
    np.testing.assert_allclose(cache.embeddings(), reference.vectors, atol=1e-6)


def rows_of(cache_dir: Path, chunks) -> int:
    """Rows the manifest at `cache_dir` plans for `chunks`."""
    sizes = json.loads((Path(cache_dir) / MANIFEST).read_text())["chunk_sizes"]
    return sum(sizes[i] for i in chunks)


def chunk_index(part: Path) -> int:
    return int(part.stem.split("-")[1])


def assert_trained_like(result, reference: SimpleNamespace, texts: pa.Table) -> None:
    """Same step count as the undisturbed run, and a student that agrees with it (dropout draws differ after a
    restart, so weights are close rather than equal)."""
    from sentence_transformers import SentenceTransformer

    assert result.steps == reference.result.steps
    assert result.metrics["samples"] == reference.result.metrics["samples"]
    assert result.metrics["val_loss"] == pytest.approx(reference.result.metrics["val_loss"], rel=0.05)
    sample = texts.column("text").to_pylist()[:: TEXTS // 100]
    a, b = (SentenceTransformer(str(path), device="cpu").encode(sample, normalize_embeddings=True)
            for path in (result.student_path, reference.result.student_path))
    assert (a * b).sum(1).min() > 0.99


# -- finding and killing this test's own Ray processes -----------------------------------------------------

def own_processes(title: str) -> list[psutil.Process]:
    """Descendants of this process whose command line holds `title`; Ray names its worker processes
    `ray::<Actor>.<method>`. Another user's Ray on the machine is never among them."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class KillWhen(threading.Thread):
    """SIGKILL one of this process's Ray workers titled `title` once `ready()` holds (polled every 50 ms): one
    running a task (titled `ray::<Actor>.<method>`) when there is one, since a pool may also hold idle actors."""

    def __init__(self, title: str, ready, timeout_s: float = 400):
        super().__init__(daemon=True)
        self.title, self.ready, self.timeout_s = title, ready, timeout_s
        self.killed: list[str] = []
        self.stop = threading.Event()
        self.start()

    def run(self):
        deadline = time.time() + self.timeout_s
        while not self.stop.is_set() and time.time() < deadline:
            if self.ready():
                found = [(" ".join(proc.cmdline()), proc) for proc in own_processes(self.title)]
                found.sort(key=lambda item: "." not in item[0].split()[0].split(self.title, 1)[-1])  # busy first
                if found:
                    self.killed.append(found[0][0])
                    found[0][1].kill()
                return
            time.sleep(0.05)


def cache_parts(cache_dir: Path) -> list[Path]:
    return sorted(Path(cache_dir).glob("part-*.parquet"))


def registered_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint Ray Train has registered for a run (its checkpoint manager's snapshot,
    which is what a restart resumes from); None before the first."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return None
    return latest["metrics"]["step"] if latest else None


# -- 1. a training worker dies ------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_killed_training_worker_restarts_from_its_last_checkpoint(reference, job):
    cfg = with_values(reference.cfg, {"name": "worker-killed", "train.max_failures": 1})  # the reference's cache
    run_dir = Path(cfg.storage.runs_root) / cfg.name
    inputs = training_inputs(cfg, job.texts)
    seen = []

    def checkpointed() -> bool:
        seen.append(registered_checkpoint_step(run_dir))
        return (seen[-1] or 0) >= CHECKPOINT_EVERY

    killer = KillWhen("RayTrainWorker", checkpointed)
    try:
        result = train_student(cfg, inputs)
    finally:
        killer.stop.set()
    assert len(killer.killed) == 1, f"no training worker was killed mid-run: {killer.killed}"
    killed_at = seen[-1]

    starts = [r for r in result.history() if r["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True]  # one restart, from a checkpoint
    resumed = starts[1]["step"]
    assert resumed >= killed_at and resumed % CHECKPOINT_EVERY == 0
    assert result.start["step"] == resumed and result.metrics["steps_this_run"] == result.steps - resumed
    assert_trained_like(result, reference, job.table)


# -- 2. a teacher actor dies ---------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_killed_teacher_actor_loses_and_duplicates_no_row(reference, job, tmp_path):
    cfg = reference.cfg.teacher
    cache_dir = cache_path_for(job.texts, cfg, tmp_path)
    killer = KillWhen("CacheWriter", lambda: len(cache_parts(cache_dir)) >= 3)
    try:
        cache = build_cache(job.texts, cfg, tmp_path)
    finally:
        killer.stop.set()
    assert len(killer.killed) == 1, f"no teacher actor was killed mid-stage: {killer.killed}"
    assert cache.manifest["last_run"]["rows_computed"] == TEXTS
    assert_same_cache(cache, reference)


# -- 3. interrupted jobs -----------------------------------------------------------------------------------

def interrupt_job(job, overrides: list[str], sig: signal.Signals, ready, log: Path) -> int:
    """Run jobs/train_student.py and send `sig` to its driver alone once `ready()` holds. Returns the driver's
    exit status once it and every Ray process it started have ended."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LEAF_DATA_DIR": str(DATA_ROOT)}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, never this test's
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "jobs/train_student.py", "--config", str(job.config), *overrides],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not ready():
            assert proc.poll() is None, f"the job ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "the job never reached the point to interrupt"
            time.sleep(0.05)
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        status = proc.wait(timeout=180)
        _, alive = psutil.wait_procs(ray_processes, timeout=60)
        assert not alive, f"{sig.name} left the driver's Ray processes running: {[p.pid for p in alive]}"
        return status
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only the session this test started
        except ProcessLookupError:
            pass
        proc.wait()


def training_starts(run_dir: Path) -> list[dict]:
    """The `start` events of a run's metrics log: one per launch of its training."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return [event for event in map(json.loads, filter(None, lines)) if event["event"] == "start"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_interrupted_job_resumes_only_the_missing_work(reference, job, tmp_path):
    """train_student.py stopped four times, each signal in each stage (SIGINT in the teacher stage, then SIGTERM
    there, then SIGINT and SIGTERM in training), then run to the end: each launch keeps what the ones before
    finished, recomputes only the chunks and steps that were missing, and the result is the undisturbed one."""
    overrides = where(tmp_path, "interrupted")
    cfg = load_config(job.config, overrides)
    cache_dir = cache_path_for(job.texts, cfg.teacher, cfg.storage.cache_root)
    run_dir = tmp_path / "runs" / "interrupted"

    def parts() -> dict[str, int]:
        return {part.name: part.stat().st_mtime_ns for part in cache_parts(cache_dir)}

    kept: dict[str, int] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        before = len(kept)
        status = interrupt_job(job, overrides, sig, lambda: len(cache_parts(cache_dir)) >= before + 3,
                               tmp_path / f"teacher-{sig.name}.log")
        assert status != 0, sig.name
        now = parts()
        assert {name: now[name] for name in kept} == kept, f"{sig.name}: finished parts were rewritten"
        assert before + 3 <= len(now) < TEXTS // CHUNK and not json.loads((cache_dir / MANIFEST).read_text())["complete"]
        assert not run_dir.exists() or registered_checkpoint_step(run_dir) is None  # training never started
        kept = now
    kept_rows = rows_of(cache_dir, [chunk_index(cache_dir / name) for name in kept])

    # SIGINT once a checkpoint is registered; SIGTERM as soon as the relaunch has resumed (its own `start` event):
    # a tiny run trains faster than its checkpoints show up, so waiting for another one could outlast the run.
    stops = []
    for sig, ready in ((signal.SIGINT, lambda: (registered_checkpoint_step(run_dir) or 0) >= CHECKPOINT_EVERY),
                       (signal.SIGTERM, lambda: len(training_starts(run_dir)) == 2)):
        resume_from = stops[-1] if stops else 0
        status = interrupt_job(job, overrides, sig, ready, tmp_path / f"train-{sig.name}.log")
        assert status != 0, sig.name
        assert training_starts(run_dir)[-1]["step"] == resume_from, f"{sig.name}: did not resume at {resume_from}"
        stops.append(registered_checkpoint_step(run_dir))
        if len(stops) == 1:  # the launch that finished the teacher stage
            stats = json.loads((cache_dir / MANIFEST).read_text())["last_run"]
            assert stats["chunks_reused"] == len(kept) and stats["rows_computed"] == TEXTS - kept_rows
    assert stops[0] <= stops[1] < reference.result.steps
    assert {name: mtime for name, mtime in parts().items() if name in kept} == kept

    finished = json.loads((cache_dir / MANIFEST).read_text())["finished"]
    inputs = training_inputs(cfg, job.texts)
    result = train_student(cfg, inputs)
    assert json.loads((cache_dir / MANIFEST).read_text())["finished"] == finished  # the teacher did not run again
    assert result.start["resumed"] and result.start["step"] == stops[-1]
    assert result.metrics["steps_this_run"] == reference.result.steps - stops[-1]
    assert_same_cache(TeacherCache.load(cache_dir), reference)
    assert_trained_like(result, reference, job.table)


# -- 4. corrupted or partial caches ---------------------------------------------------------------------------

def copied_cache(reference: SimpleNamespace, root: Path) -> TeacherCache:
    """A copy of the reference cache under `root`, to damage."""
    shutil.copytree(reference.cache_root / "teacher", root / "teacher")
    return TeacherCache.load(root / Path(reference.cache.path).relative_to(reference.cache_root))


def test_parts_of_the_wrong_width_or_row_count_are_recomputed_alone_or_refused(reference, job, tmp_path):
    cache = copied_cache(reference, tmp_path)
    part = pq.read_table(cache.part_path(1))
    wider = np.pad(np.stack(part.column("embedding").to_numpy(zero_copy_only=False)), ((0, 0), (0, 16)))
    pq.write_table(part.set_column(3, "embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(wider.reshape(-1).astype(np.float32)), wider.shape[1])), cache.part_path(1))  # a 48-d part
    pq.write_table(pq.read_table(cache.part_path(3)).slice(1), cache.part_path(3))  # a row short

    teacher = reference.cfg.teacher
    with pytest.raises(CacheDamagedError, match="part-00001"):
        build_cache(job.texts, teacher.model_copy(update={"on_damaged_cache": "error"}), tmp_path)
    with pytest.raises(CacheDamagedError, match=r"parts \[1, 3\]"):
        TeacherCache.load(cache.path)
    repaired = build_cache(job.texts, teacher, tmp_path)
    assert repaired.manifest["last_run"].items() >= {"chunks_computed": 2, "rows_computed": rows_of(cache.path, [1, 3]),
                                                     "chunks_reused": cache.chunks - 2}.items()
    assert_same_cache(repaired, reference)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_part_counts_only_with_the_cache_dimension_and_dtype(tmp_path, dtype):
    rows = pa.table({"id": [f"r{i}" for i in range(40)], "text": [f"text {i}" for i in range(40)],
                     "kind": ["query"] * 40})
    cache = TeacherCache.open(tmp_path, TeacherConfig(model="m", cache_dtype=dtype), plan_table(rows, 2), chunk_rows=20)
    cache.set_dim(3)
    chunk = chunk_of(rows.column("id").to_pylist(), 2)

    def write(target: TeacherCache, index: int, dim: int) -> None:
        part = rows.filter(pa.array(chunk == index))
        target.write_chunk(index, *(part.column(c).to_pylist() for c in ("id", "text", "kind")),
                           np.ones((len(part), dim)))

    write(cache, 0, 3)
    assert cache.chunk_ok(0) and cache.missing_chunks() == [1]
    other = "float16" if dtype == "float32" else "float32"
    for manifest, dim in ((cache.manifest | {"dtype": other}, 3), (cache.manifest | {"dim": 4}, 4)):
        write(TeacherCache(cache.location, manifest), 1, dim)
        assert not cache.chunk_ok(1) and cache.missing_chunks() == [1]
    with pytest.raises(CacheDamagedError, match="chunk 1: got 1 rows that are not the chunk's"):
        cache.write_chunk(1, ["r0"], ["text 0"], ["query"], np.ones((1, 3)))


def test_manifest_row_count_mismatch_is_refused(reference, job, tmp_path):
    cache = copied_cache(reference, tmp_path)
    manifest = Path(cache.path) / MANIFEST
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"rows": TEXTS + 7}))
    with pytest.raises(CacheMismatchError, match=f"manifest rows={TEXTS + 7}, expected {TEXTS}"):
        build_cache(job.texts, reference.cfg.teacher, tmp_path)


def test_a_damaged_manifest_is_refused_naming_its_file(reference, job, tmp_path):
    cache = copied_cache(reference, tmp_path)
    manifest = Path(cache.path) / MANIFEST
    manifest.write_text(manifest.read_text()[:40])  # cut off mid-write by a crash outside leaf-ray's atomic writes
    for open_cache in (lambda: build_cache(job.texts, reference.cfg.teacher, tmp_path),
                       lambda: TeacherCache.load(cache.path)):
        with pytest.raises(CacheDamagedError, match=f"{manifest}.*not valid JSON"):
            open_cache()


# -- 5. bad teachers and bad texts ----------------------------------------------------------------------------

def small_table(texts: list[str], kinds: list[str] | None = None) -> pa.Table:
    kinds = kinds or ["query" if i % 3 else "document" for i in range(len(texts))]
    return pa.table({"id": [f"x{i}" for i in range(len(texts))], "text": texts, "kind": kinds})


def small_teacher(model: Path | str, **kw) -> TeacherConfig:
    return TeacherConfig(model=str(model), max_length=64, batch_size=4, chunk_rows=16, num_cpus_per_actor=0.5,
                         torch_threads=1, **kw)


def poison_word(model_dir: Path, word: str) -> None:
    """Set one vocabulary word's input embedding to NaN in the model's safetensors weights."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids(word)
    weights = model_dir / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[key][token] = torch.nan
    save_file(state, weights, metadata={"format": "pt"})


@pytest.mark.timeout(300)
def test_a_teacher_returning_nan_is_refused_before_the_cache(ray_local, tmp_path):
    model = build_tiny_bert(tmp_path / "nan-teacher")
    poison_word(model, "protein")
    texts = [t.replace("protein", "gene") for t in random_texts(96, seed=4)]
    texts[70] += " protein"  # one text meets the NaN weights
    table = small_table(texts)
    cfg = small_teacher(model)
    with pytest.raises(Exception, match=r"returned NaN/Inf for 1 of \d+ texts"):
        build_cache(table, cfg, tmp_path / "cache")
    cache_dir = cache_path_for(table, cfg, tmp_path / "cache")
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert not manifest["complete"]
    poisoned = chunk_of(["x70"], manifest["chunks"])[0]
    assert not (cache_dir / f"part-{poisoned:05d}.parquet").exists()
    for part in cache_parts(cache_dir):  # whatever was written before the failure is whole and finite
        assert np.isfinite(np.stack(pq.read_table(part).column("embedding").to_numpy(zero_copy_only=False))).all()


@pytest.mark.timeout(300)
def test_a_teacher_of_the_wrong_dimension_is_refused_before_the_cache(ray_local, tmp_path):
    model = build_tiny_bert(tmp_path / "teacher", hidden=32)
    pooling = model / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text())
    settings |= {key: 48 for key in ("embedding_dimension", "word_embedding_dimension") if key in settings}
    pooling.write_text(json.dumps(settings))  # the model declares 48-d vectors and returns 32-d ones
    table = small_table(random_texts(40, seed=2))
    cfg = small_teacher(model)
    with pytest.raises(Exception, match=r"returned shape \(\d+, 32\), expected \(\d+, 48\)"):
        build_cache(table, cfg, tmp_path / "cache")
    cache_dir = cache_path_for(table, cfg, tmp_path / "cache")
    assert not cache_parts(cache_dir)


@pytest.mark.timeout(300)
def test_an_unknown_teacher_fails_the_stage_at_once_saying_what_was_tried(ray_local, tmp_path):
    started = time.time()
    with pytest.raises(Exception, match=r"(?s)'no-such-org/no-such-model' not found. Tried:.*local path"):
        build_cache(small_table(random_texts(20)), small_teacher("no-such-org/no-such-model"), tmp_path)
    assert time.time() - started < 240  # one failed actor start, not a retry loop


@pytest.mark.timeout(300)
def test_empty_and_overlong_texts_are_embedded_truncated_and_counted(ray_local, tiny_teacher, tmp_path):
    """Texts reach the teacher unfiltered when they skip the mix (evaluation corpora): empty ones get a vector,
    overlong ones are cut at max_length and counted in the cache's last_run."""
    prefix = random_texts(1, seed=5, min_words=300, max_words=300)[0]
    overlong = [prefix + " gene cell", prefix + " mouse human", random_texts(1, seed=6, min_words=5000,
                                                                             max_words=5000)[0]]
    texts = random_texts(30, seed=3, max_words=10) + ["", "   \t\n"] + overlong
    kinds = ["query"] * 30 + ["query", "document"] + ["document"] * 3
    table = small_table(texts, kinds)
    cache = build_cache(table, small_teacher(tiny_teacher), tmp_path)
    assert cache.manifest["last_run"]["truncated_texts"] == 3
    vectors = cache.vectors_for(table.column("id").to_pylist())
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vectors[-3], vectors[-2], atol=1e-6)  # only the first 64 tokens count
    assert sorted(cache.read_table(["id"]).column("id").to_pylist()) == sorted(table.column("id").to_pylist())


# -- 6. secrets ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_secrets_stay_out_of_a_whole_run(tiny_teacher, tmp_path):
    """A training job with an endpoint teacher that needs an API key, then a teacher job against a server that
    rejects the key and echoes it back. The key, an HF token and an AWS secret in the environment appear in no
    output, log (the driver's and every Ray process's), run file, checkpoint, manifest, cache file or error."""
    from tests.test_teacher_backends import FakeEmbeddings

    secrets = {name: f"{prefix}-{os.urandom(8).hex()}" for name, prefix in
               (("LEAF_TEST_API_KEY", "sk-leaf"), ("HF_TOKEN", "hf_leaf"), ("AWS_SECRET_ACCESS_KEY", "aws-leaf"))}
    server, rejecting = FakeEmbeddings(key=secrets["LEAF_TEST_API_KEY"]), FakeEmbeddings(key="another-key")
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrs", dir="/tmp"))  # short: Ray's socket paths are limited
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"s{i}", "text": t, "kind": "query" if i % 3 else "document"}) + "\n"
                             for i, t in enumerate(random_texts(160, seed=8))))
    endpoint = {"base_url": server.url, "api_key_env": "LEAF_TEST_API_KEY", "max_retries": 1, "backoff_s": 0.01,
                "backoff_max_s": 0.05, "timeout_s": 10}
    config = tmp_path / "secret.yaml"
    config.write_text(yaml.safe_dump({
        "name": "secret", "data": {"root": str(DATA_ROOT), "validation_size": 16, "sources": [{"path": str(texts)}]},
        "teacher": {"model": str(tiny_teacher), "backend": "endpoint", "max_length": 64, "batch_size": 8,
                    "chunk_rows": 32, "num_cpus_per_actor": 0.5, "endpoint": endpoint},
        "student": {"kind": "teacher_layers", "layers": [0], "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 16, "num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1,
                  "checkpoint_every_steps": 3, "log_every_steps": 3},
        "ray": {"num_cpus": 2},
        "storage": {"cache_root": str(tmp_path / "cache"), "runs_root": str(tmp_path / "runs")}}))
    script = textwrap.dedent(f"""
        import logging, runpy, sys
        sys.path.insert(0, {str(REPO)!r})
        sys.argv = ["train_student.py", "--config", {str(config)!r}]
        runpy.run_path("jobs/train_student.py", run_name="__main__")
        logging.getLogger().setLevel(logging.DEBUG)
        # another query prompt: a teacher setting of its own, so no row is copied from the first job's cache and
        # the rejecting server is asked
        sys.argv = ["embed_teacher.py", "--config", {str(config)!r}, "teacher.endpoint.base_url={rejecting.url}",
                    "data.sources.0.limit=50", "teacher.query_prompt=query"]
        try:
            runpy.run_path("jobs/embed_teacher.py", run_name="__main__")
        except SystemExit as exit:  # a job reports a user error as one line and exits 2
            print("TEACHER JOB FAILED", exit.code)
    """)
    env = {**os.environ, **secrets, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    try:
        run = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=800)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        assert "TEACHER JOB FAILED 2" in output and "Bearer ***" in output  # the echoed key was masked
        assert {r["auth"] for r in server.requests} == {f"Bearer {secrets['LEAF_TEST_API_KEY']}"}
        assert (tmp_path / "runs" / "secret" / "student" / "leaf_manifest.json").is_file()
        files = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        assert len(files) > 50 and any("checkpoint_" in str(p) for p in files)
        for name, value in secrets.items():
            assert value not in output, f"{name} printed"
            leaks = [p for p in files if value.encode() in p.read_bytes()]
            assert not leaks, f"{name} written to {leaks}"
    finally:
        server.close()
        rejecting.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- 7. unwritable output -----------------------------------------------------------------------------------------

@pytest.fixture(params=["file-in-the-way", "read-only-dir"])
def unwritable(request, tmp_path) -> Path:
    """A directory that cannot be created or written: under a regular file, or inside a read-only directory."""
    if request.param == "file-in-the-way":
        (tmp_path / "file").write_text("not a directory")
        return tmp_path / "file" / "out"
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; the file-in-the-way case covers root")
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro" / "out"


@pytest.mark.parametrize("field", ["storage.runs_root", "storage.cache_root"])
def test_unwritable_roots_fail_before_the_teacher_stage(job, tmp_path, unwritable, field):
    cfg = load_config(job.config, where(tmp_path, "unwritable") + [f"{field}={unwritable}"])
    with pytest.raises(StorageError, match=f"{field}: .* is not writable"):
        training_inputs(cfg, job.texts)
    assert not list(tmp_path.rglob("manifest.json")), "the teacher stage started"
    if field == "storage.cache_root":  # embed_teacher.py's path: the cache itself refuses before the stage
        with pytest.raises(StorageError, match=f"{field}: .* is not writable"):
            build_cache(job.texts, cfg.teacher, cfg.storage.cache_location())


@pytest.mark.timeout(300)
def test_distill_job_refuses_an_unwritable_run_folder_before_starting_ray(job, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "jobs/distill.py", "--config", str(job.config), "name=unwritable",
                          f"storage.runs_root={tmp_path / 'file' / 'runs'}", f"storage.cache_root={tmp_path / 'c'}"],
                         check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 2  # a user error: one line, no traceback (leaf_ray.errors.run_job)
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: storage.runs_root") and "is not writable" in last
    assert "Traceback" not in run.stderr
    assert "Started a local Ray instance" not in run.stdout + run.stderr and not (tmp_path / "c").exists()
