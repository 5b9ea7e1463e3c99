"""The teacher on ONNX Runtime (`teacher.backend: onnx`), for CPU pools, where the teacher is what limits how many
texts a run can afford.

The graph is the fused one leaf_ray.onnx_export writes for serving, exported once per teacher setting into the model
store (`<models root>/onnx/<teacher fingerprint>/`, atomically and under a lock, so the actors of a node share one
export). Before any of its vectors leave the actor, the first texts of each kind are also encoded by PyTorch and
must agree (cosine at least `AGREEMENT`): a graph that computes something else never reaches a cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from leaf_ray.config import TeacherConfig
from leaf_ray.models import ModelStore, exclusive
from leaf_ray.onnx_export import ONNX_CONFIG, OnnxEncoder, export_onnx
from leaf_ray.teacher.backends import TeacherOutputError, TransformersBackend, actor_threads, check_vectors
from leaf_ray.teacher.cache import teacher_fingerprint

AGREEMENT = 0.9999  # least cosine between an ONNX vector and PyTorch's of the same text
CHECK_TEXTS = 16  # texts of each kind encoded both ways before the backend's first vectors of that kind


def exported_teacher(model, cfg: TeacherConfig, models: ModelStore) -> Path:
    """The teacher's ONNX serving directory in the model store, exported on first use."""
    target = models.root / "onnx" / teacher_fingerprint(cfg)
    if (target / ONNX_CONFIG).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / f".{target.name}.lock"):
        if not (target / ONNX_CONFIG).is_file():  # not written by another actor while this one waited
            work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                export_onnx(model, work / "graph")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(work / "graph", target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return target


class OnnxBackend(TransformersBackend):
    """The transformers backend's model, served through its fused ONNX graph on CPU (float32)."""

    def __init__(self, cfg: TeacherConfig, models: ModelStore):
        super().__init__(cfg, models)
        self.encoder = OnnxEncoder(exported_teacher(self.model, cfg, models), threads=actor_threads(cfg))
        self.checked: set[str] = set()

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        prompt = self.cfg.prompt_for(kind) or None
        vectors = self.encoder.encode(texts, prompt=prompt, batch_size=self.cfg.batch_size,
                                      normalize_embeddings=self.cfg.normalize)
        vectors = check_vectors(np.asarray(vectors, dtype=np.float32), len(texts), self.dim, self.cfg.model)
        if kind not in self.checked and texts:
            self._check_against_pytorch(texts[:CHECK_TEXTS], vectors[:CHECK_TEXTS], kind)
            self.checked.add(kind)
        return vectors

    def _check_against_pytorch(self, texts: list[str], vectors: np.ndarray, kind: str) -> None:
        reference = super().embed(texts, kind)
        cosines = (vectors * reference).sum(1) / np.maximum(
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
        worst = int(np.argmin(cosines))
        if cosines[worst] < AGREEMENT:
            raise TeacherOutputError(
                f"teacher {self.cfg.model} on ONNX Runtime disagrees with PyTorch: cosine {cosines[worst]:.6f} < "
                f"{AGREEMENT} on {kind} text {texts[worst][:60]!r}; use teacher.backend: transformers")
