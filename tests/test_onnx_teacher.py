"""The onnx teacher backend: the fused ONNX graph of a real (tiny) teacher, exported once into the model store,
checked against PyTorch before its vectors are used, and run by the Ray Data teacher stage."""

from __future__ import annotations

import numpy as np
import pytest

from leaf_ray.config import ConfigError, TeacherConfig, load_config
from leaf_ray.models import ModelStore
from leaf_ray.onnx_export import MODEL_FILE, export_onnx
from leaf_ray.teacher import build_cache
from leaf_ray.teacher.backends import TeacherOutputError, TransformersBackend, make_backend
from leaf_ray.teacher.cache import teacher_fingerprint
from leaf_ray.teacher.onnx_backend import AGREEMENT

from .conftest import build_tiny_bert, random_texts, text_rows, tiny_teacher_config


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.timeout(180)
def test_onnx_vectors_equal_pytorch_and_the_graph_is_exported_once(tiny_teacher, tmp_path):
    cfg, store = tiny_teacher_config(tiny_teacher, backend="onnx"), ModelStore(tmp_path / "models")
    onnx = make_backend(cfg, store)
    graph = store.root / "onnx" / teacher_fingerprint(cfg) / MODEL_FILE
    exported_at = graph.stat().st_mtime_ns
    plain = TransformersBackend(cfg.model_copy(update={"backend": "transformers"}), store)
    for kind, texts in (("query", random_texts(40, 1, 1, 8)), ("document", random_texts(40, 2, 20, 60))):
        vectors = onnx.embed(texts, kind)
        assert vectors.shape == (40, plain.dim) and vectors.dtype == np.float32
        assert cosines(vectors, plain.embed(texts, kind)).min() >= AGREEMENT  # prompts and truncation included
        assert onnx.count_truncated(texts, kind) == plain.count_truncated(texts, kind)
    make_backend(cfg, store)  # a second actor of the node reuses the export
    assert graph.stat().st_mtime_ns == exported_at


@pytest.mark.timeout(180)
def test_a_graph_that_disagrees_with_pytorch_is_refused_before_its_vectors_are_returned(tiny_teacher, tmp_path):
    from sentence_transformers import SentenceTransformer

    cfg, store = tiny_teacher_config(tiny_teacher, backend="onnx"), ModelStore(tmp_path / "models")
    other = build_tiny_bert(tmp_path / "other", hidden=32, layers=4, seed=1)  # same shapes, other weights
    export_onnx(SentenceTransformer(str(other), device="cpu"), store.root / "onnx" / teacher_fingerprint(cfg))
    backend = make_backend(cfg, store)  # finds a graph in its place: only the check can tell it is not the teacher's
    with pytest.raises(TeacherOutputError, match="disagrees with PyTorch.*teacher.backend: transformers"):
        backend.embed(random_texts(8, 3), "query")


@pytest.mark.timeout(60)
def test_the_onnx_backend_is_a_cpu_float32_teacher_with_its_own_cache(tmp_path):
    for bad in ({"num_gpus_per_actor": 1}, {"dtype": "float16"}):
        with pytest.raises(ValueError, match="backend 'onnx' runs float32 on CPU"):
            TeacherConfig(backend="onnx", **bad)
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  backend: onnx\n  dtype: bfloat16\n")
    with pytest.raises(ConfigError, match="teacher"):
        load_config(config)
    assert teacher_fingerprint(TeacherConfig(backend="onnx")) != teacher_fingerprint(TeacherConfig())


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_teacher_stage_on_onnx_caches_pytorch_equal_vectors(ray_local, tiny_teacher, tmp_path):
    table = text_rows(300)
    cfg = tiny_teacher_config(tiny_teacher, num_cpus_per_actor=0.5, chunk_rows=100)
    store = ModelStore(tmp_path / "models")
    plain = build_cache(table, cfg, tmp_path / "cache", store)
    onnx = build_cache(table, cfg.model_copy(update={"backend": "onnx"}), tmp_path / "cache", store)
    assert onnx.path != plain.path and onnx.manifest["rows"] == plain.manifest["rows"] == 300
    ids = table.column("id").to_pylist()
    assert cosines(onnx.vectors_for(ids), plain.vectors_for(ids)).min() >= AGREEMENT
