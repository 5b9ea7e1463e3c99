"""Teacher backends: one interface (texts of one kind -> float32 vectors), one class per way to run a teacher.

The Ray Data stage only talks to `TeacherBackend`; ONNX Runtime graphs, vLLM engines and HTTP endpoints plug in
behind it.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from leaf_ray.config import TeacherConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.models import ModelStore


class TeacherOutputError(LeafRayError, RuntimeError):
    """The teacher returned vectors that must not reach a cache (NaN/Inf, wrong shape)."""


class TeacherBackendError(LeafRayError, RuntimeError):
    """A backend that cannot run here (a missing optional package)."""


class TeacherBackend(Protocol):
    dim: int

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        """Vectors (len(texts), dim) float32 for texts of one kind, with that kind's prompt applied."""

    def count_truncated(self, texts: list[str], kind: str) -> int:
        """How many of `texts` (with prompt) exceed the max length and are cut by the tokenizer."""


def actor_threads(cfg: TeacherConfig) -> int:
    """Intra-op threads of a teacher actor: `teacher.torch_threads`, else the actor's CPUs rounded up."""
    return cfg.torch_threads or max(1, math.ceil(cfg.num_cpus_per_actor))


def _device(cfg: TeacherConfig) -> str:
    import torch

    return "cuda" if cfg.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"


class TransformersBackend:
    """A sentence-transformers / Hugging Face encoder run in-process (CPU or one GPU)."""

    def __init__(self, cfg: TeacherConfig, models: ModelStore):
        import torch

        torch.set_num_threads(actor_threads(cfg))
        self.cfg = cfg
        device = _device(cfg)
        self.model = models.load(cfg.model, device=device, trust_remote_code=cfg.trust_remote_code,
                                 allow_pickle_weights=cfg.allow_pickle_weights, max_length=cfg.max_length)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("float16" if device == "cuda" else "float32")
        if dtype != "float32":
            self.model.to(getattr(torch, dtype))
        self.model.eval()
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        vectors = self.model.encode(
            texts, prompt=self.cfg.prompt_for(kind) or None, batch_size=self.cfg.batch_size,
            normalize_embeddings=self.cfg.normalize, convert_to_numpy=True, show_progress_bar=False,
        )
        return check_vectors(np.asarray(vectors, dtype=np.float32), len(texts), self.dim, self.cfg.model)

    def count_truncated(self, texts: list[str], kind: str) -> int:
        prompt = self.cfg.prompt_for(kind)
        lengths = self.model.tokenizer([prompt + t for t in texts], add_special_tokens=True,
                                       truncation=False, return_length=True, verbose=False)["length"]
        return int(sum(n > self.cfg.max_length for n in lengths))


def check_vectors(vectors: np.ndarray, rows: int, dim: int, teacher: str) -> np.ndarray:
    """Refuse NaN/Inf or misshapen teacher output before it can be cached or trained on."""
    if vectors.shape != (rows, dim):
        raise TeacherOutputError(f"teacher {teacher} returned shape {vectors.shape}, expected ({rows}, {dim})")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise TeacherOutputError(f"teacher {teacher} returned NaN/Inf for {int(bad.sum())} of {rows} texts "
                                 f"(first at batch row {int(np.argmax(bad))})")
    return vectors


def _vllm_backend(cfg: TeacherConfig, models: ModelStore) -> TeacherBackend:
    from leaf_ray.teacher.vllm_backend import VllmBackend  # imports vllm: only where this backend runs

    return VllmBackend(cfg, models)


def _endpoint_backend(cfg: TeacherConfig, models: ModelStore) -> TeacherBackend:
    from leaf_ray.teacher.endpoint_backend import EndpointBackend

    return EndpointBackend(cfg, models)


def _onnx_backend(cfg: TeacherConfig, models: ModelStore) -> TeacherBackend:
    try:
        from leaf_ray.teacher.onnx_backend import OnnxBackend  # imports onnxruntime and the exporter
    except ModuleNotFoundError as exc:
        raise TeacherBackendError(f"teacher.backend 'onnx' needs {exc.name}: pip install 'leaf-ray[onnx]'") from None

    return OnnxBackend(cfg, models)


BACKENDS = {"transformers": TransformersBackend, "onnx": _onnx_backend, "vllm": _vllm_backend,
            "endpoint": _endpoint_backend}


def make_backend(cfg: TeacherConfig, models: ModelStore) -> TeacherBackend:
    return BACKENDS[cfg.backend](cfg, models)
