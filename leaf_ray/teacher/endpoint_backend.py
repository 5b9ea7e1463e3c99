"""The `endpoint` teacher backend: any OpenAI-compatible embeddings server (`POST {base_url}/v1/embeddings`).

A vLLM server (`python -m vllm.entrypoints.openai.api_server --runner pooling`), Text Embeddings
Inference, Infinity, or a hosted API. Each Ray Data actor holds one HTTP client and sends up to
`endpoint.max_concurrency` requests of `endpoint.request_batch_size` texts at a time. 429, 5xx, timeouts
and connection errors are retried with exponential backoff (and jitter; a 429's Retry-After is honoured);
other 4xx answers are not retried. When the server stays down the error names the endpoint.

The API key comes from the environment variable named by `endpoint.api_key_env`, read inside the actor:
it is never part of a config, a cache manifest or a log line, and is masked in every error message.
Actors see the environment their node's Ray was started with: export the variable before `ray.init()` /
`ray start` on every node (or through the cluster's secret mechanism), not only in the driver.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np

from leaf_ray.config import TeacherConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.models import ModelStore
from leaf_ray.teacher.backends import check_vectors

log = logging.getLogger(__name__)
MASK = "***"
ERROR_BODY_CHARS = 300


class EndpointError(LeafRayError, RuntimeError):
    """The endpoint refused the request, answered garbage, or stayed unreachable; the message names it."""


def embeddings_url(base_url: str) -> str:
    """`{base_url}/v1/embeddings`; a base_url that already ends in /v1 is not doubled."""
    base = base_url.rstrip("/")
    return f"{base}/embeddings" if base.endswith("/v1") else f"{base}/v1/embeddings"


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Wait before retry `attempt` (0-based): base * 2**attempt, capped, times a jitter in [0.5, 1]."""
    jitter = 0.5 + 0.5 * (rng or random).random()
    return min(max_s, base_s * (2 ** attempt)) * jitter


def is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class EndpointBackend:
    """Teacher vectors from an OpenAI-compatible embeddings endpoint."""

    def __init__(self, cfg: TeacherConfig, models: ModelStore):
        import httpx

        self.cfg = cfg
        self.opts = cfg.endpoint
        if not self.opts.base_url:
            raise EndpointError("teacher.endpoint.base_url is not set")
        self.url = embeddings_url(self.opts.base_url)
        self.model_name = self.opts.model or cfg.model
        self._models = models
        self._secret: str | None = None
        headers = {}
        if self.opts.api_key_env:
            self._secret = os.environ.get(self.opts.api_key_env) or None
            if self._secret is None:
                raise EndpointError(
                    f"environment variable {self.opts.api_key_env} (teacher.endpoint.api_key_env) is not set in "
                    f"this process; Ray actors see the environment their node was started with, so export it "
                    f"before ray.init()/ray start on every node")
            headers["Authorization"] = f"Bearer {self._secret}"
        self._client = httpx.Client(
            timeout=self.opts.timeout_s, headers=headers,
            limits=httpx.Limits(max_connections=self.opts.max_concurrency,
                                max_keepalive_connections=self.opts.max_concurrency))
        self._pool = ThreadPoolExecutor(self.opts.max_concurrency, thread_name_prefix="teacher-endpoint")
        self._tokenizer, self._tokenizer_lock, self._no_tokenizer = None, threading.Lock(), False
        self.requests = self.retries = 0  # counters, for tests and benchmarks
        self._count_lock = threading.Lock()
        try:  # one short request: learns the dimension and fails early (naming the endpoint) when it is down
            self.dim = int(self._post(["dimension probe"]).shape[1])
        except BaseException:
            self.close()
            raise

    # -- the TeacherBackend interface ------------------------------------------------------------
    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prompt = self.cfg.prompt_for(kind)
        inputs = [prompt + t for t in texts]
        size = self.opts.request_batch_size
        futures = [self._pool.submit(self._post, inputs[i:i + size]) for i in range(0, len(inputs), size)]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                for other in pending:
                    other.cancel()
                raise future.exception()
        vectors = np.concatenate([f.result() for f in futures])
        if self.cfg.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms > 0, norms, 1)
        return check_vectors(vectors.astype(np.float32, copy=False), len(texts), self.dim, self.model_name)

    def count_truncated(self, texts: list[str], kind: str) -> int:
        """Texts (with prompt) over teacher.max_length tokens, counted with a local copy of the tokenizer
        (`endpoint.tokenizer`, else teacher.model); 0 with a warning when no local tokenizer resolves."""
        tokenizer = self._local_tokenizer()
        if tokenizer is None or not texts:
            return 0
        prompt = self.cfg.prompt_for(kind)
        ids = tokenizer([prompt + t for t in texts], add_special_tokens=True, truncation=False,
                        verbose=False)["input_ids"]
        return int(sum(len(i) > self.cfg.max_length for i in ids))

    # -- HTTP ---------------------------------------------------------------------------------------
    def _payload(self, inputs: list[str]) -> dict:
        payload = {"model": self.model_name, "input": inputs, "encoding_format": "float"}
        if self.opts.dimensions is not None:
            payload["dimensions"] = self.opts.dimensions
        if self.opts.truncate_prompt_tokens:
            payload["truncate_prompt_tokens"] = self.cfg.max_length
        return payload

    def _post(self, inputs: list[str]) -> np.ndarray:
        """One request, retried on 429/5xx/timeouts/connection errors; (len(inputs), dim) float32."""
        import httpx

        payload = self._payload(inputs)
        started, last = time.monotonic(), ""
        attempts = self.opts.max_retries + 1
        for attempt in range(attempts):
            with self._count_lock:
                self.requests += 1
            retry_after = 0.0
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._parse(response, len(inputs))
                last = f"HTTP {response.status_code}: {response.text[:ERROR_BODY_CHARS]!r}"
                if not is_retryable_status(response.status_code):
                    raise EndpointError(self._redact(
                        f"embeddings endpoint {self.url} refused the request (model {self.model_name!r}, "
                        f"{len(inputs)} texts): {last}; not retried")) from None
                retry_after = _retry_after_s(response)
            if attempt + 1 < attempts:
                delay = max(backoff_delay(attempt, self.opts.backoff_s, self.opts.backoff_max_s),
                            min(retry_after, self.opts.backoff_max_s))
                with self._count_lock:
                    self.retries += 1
                log.warning("%s", self._redact(f"embeddings endpoint {self.url}: {last}; retry {attempt + 1}/"
                                               f"{self.opts.max_retries} in {delay:.2f}s"))
                time.sleep(delay)
        raise EndpointError(self._redact(
            f"embeddings endpoint {self.url} is unreachable or failing: {attempts} attempts over "
            f"{time.monotonic() - started:.1f}s, last error: {last}")) from None

    def _parse(self, response, rows: int) -> np.ndarray:
        try:
            data = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = np.asarray([item["embedding"] for item in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EndpointError(self._redact(
                f"embeddings endpoint {self.url} answered 200 with an unreadable body "
                f"({type(exc).__name__}: {exc}): {response.text[:ERROR_BODY_CHARS]!r}")) from None
        if vectors.ndim != 2 or len(vectors) != rows:
            raise EndpointError(f"embeddings endpoint {self.url} returned {vectors.shape} for {rows} texts")
        return vectors

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, MASK) if self._secret else text

    # -- helpers ------------------------------------------------------------------------------------
    def _local_tokenizer(self):
        if self._tokenizer is not None or self._no_tokenizer:
            return self._tokenizer
        with self._tokenizer_lock:
            if self._tokenizer is None and not self._no_tokenizer:
                name = self.opts.tokenizer or self.cfg.model
                try:
                    from transformers import AutoTokenizer

                    path = self._models.resolve(name)
                    self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                except Exception as exc:  # noqa: BLE001 - counting is best effort; the vectors are not
                    self._no_tokenizer = True
                    log.warning("no local tokenizer for %r (%s); truncated texts are not counted for the "
                                "endpoint teacher (set teacher.endpoint.tokenizer)", name, type(exc).__name__)
        return self._tokenizer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __repr__(self) -> str:  # never the key
        auth = f", api_key_env={self.opts.api_key_env!r}" if self.opts.api_key_env else ""
        return f"EndpointBackend(url={self.url!r}, model={self.model_name!r}{auth})"

    def __reduce__(self):
        raise TypeError("EndpointBackend holds an API key and is not picklable; build it inside the actor")


def _retry_after_s(response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", 0)))
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return 0.0
