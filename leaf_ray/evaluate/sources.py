"""Where the vectors come from: a vector source maps texts to vectors, the teacher's through the project's
teacher cache and the student's from its loaded model, each text encoded once per source. Which teacher a
student is compared with, and the prompts it is encoded with, are resolved here too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from leaf_ray.config import TeacherConfig
from leaf_ray.evaluate.compression import truncate
from leaf_ray.evaluate.data import EncodeRequest, EvaluationError
from leaf_ray.models import ModelStore
from leaf_ray.progress import bars_shown

log = logging.getLogger(__name__)

# (texts, ids, kind) -> float32 [len(texts), dim]. Ids let a source serve cached vectors (the teacher cache).
VectorSource = Callable[[list[str], list[str], str], np.ndarray]


def _normalised(vectors: np.ndarray, rows: int, name: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != rows:
        raise EvaluationError(f"encoder {name!r} returned shape {vectors.shape} for {rows} texts")
    if not np.isfinite(vectors).all():
        raise EvaluationError(f"encoder {name!r} returned NaN/Inf vectors")
    return truncate(vectors, vectors.shape[1])


def encode_once(sources: Mapping[str, VectorSource], texts: list[str], ids: list[str], kind: str,
                timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """L2-normalised vectors of `texts` from every named source. A source object registered under several
    names (the teacher standing in as its own student) is run once; every variant is derived from these."""
    done: dict[int, np.ndarray] = {}
    out = {}
    for name, source in sources.items():
        if id(source) not in done:
            started = time.perf_counter()
            done[id(source)] = _normalised(source(texts, ids, kind), len(texts), name)
            if timings is not None:
                timings[f"encode_{name}_{kind}_s"] = round(time.perf_counter() - started, 2)
        out[name] = done[id(source)]
    return out


def sentence_transformer_source(model, prompts: Mapping[str, str], batch_size: int = 64,
                                progress: bool | None = None) -> VectorSource:
    """Encode directly with a loaded SentenceTransformer, prompting each kind as given; a progress bar as
    `progress` says, by default on a terminal only."""
    shown = bars_shown(progress)

    def encode(texts: list[str], ids: list[str], kind: str) -> np.ndarray:
        return model.encode(texts, prompt=prompts.get(kind) or None, batch_size=batch_size,
                            normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=shown)

    return encode


class TeacherCacheSource:
    """The teacher's vectors through the project's parquet cache (a Ray Data stage): every student of a teacher
    is evaluated against the same cached teacher vectors, and only the first evaluation pays. `prefetch` takes
    everything an evaluation will ask for at once, so its datasets and sides share one stage (one start of the
    teacher pool) and one cache. `cache_root` and `models` as for leaf_ray.teacher.build_cache (the cache may be
    in a bucket)."""

    def __init__(self, teacher: TeacherConfig, cache_root, models: ModelStore | None = None):
        self.teacher, self.cache_root, self.models = teacher, cache_root, models
        self._vectors: dict[tuple[str, str], np.ndarray] = {}  # (kind, id) -> vector

    def prefetch(self, requests: Iterable[EncodeRequest]) -> None:
        import pyarrow as pa

        from leaf_ray.teacher import teacher_embeddings

        missing = {(kind, i): text for texts, ids, kind in requests for i, text in zip(ids, texts)
                   if (kind, i) not in self._vectors}
        if missing:
            table = pa.table({"id": [f"{kind}:{i}" for kind, i in missing], "text": list(missing.values()),
                              "kind": [kind for kind, _ in missing]})
            vectors = teacher_embeddings(table, self.teacher, self.cache_root, self.models)
            self._vectors.update(zip(missing, vectors))

    def __call__(self, texts: list[str], ids: list[str], kind: str) -> np.ndarray:
        self.prefetch([(texts, ids, kind)])
        return np.stack([self._vectors[kind, i] for i in ids])


def prefetch(sources: Mapping[str, VectorSource], requests: Sequence[EncodeRequest]) -> None:
    """Hand every source that can batch (a TeacherCacheSource) all the requests of an evaluation up front."""
    for source in {id(s): s for s in sources.values()}.values():
        if hasattr(source, "prefetch"):
            source.prefetch(requests)


def load_manifest(student_dir: Path) -> dict | None:
    """The student's leaf_manifest.json, checked for what evaluation needs; None for a plain model."""
    from leaf_ray.student import MANIFEST_NAME, read_manifest

    path = Path(student_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(student_dir)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest.get("teacher"), dict) or not manifest["teacher"].get("model"):
        raise EvaluationError(f"{path}: needs a 'teacher' object with at least 'model'")
    return manifest


def resolve_teacher(student_dir: Path | None, teacher: str | None, base: TeacherConfig) -> TeacherConfig:
    """The teacher to compare with: `teacher` if given, else the student manifest's. The manifest's settings
    (prompts, max_length, ...) apply when it names that same teacher; otherwise `base`'s do."""
    manifest = load_manifest(student_dir) if student_dir is not None and Path(student_dir).is_dir() else None
    if teacher is None and manifest is None:
        raise EvaluationError(f"{student_dir}: no leaf_manifest.json names the teacher; pass the teacher explicitly")
    if manifest is not None and teacher in (None, manifest["teacher"]["model"]):
        known = {k: v for k, v in manifest["teacher"].items() if k in TeacherConfig.model_fields}
        return TeacherConfig.model_validate(base.model_dump() | known)
    return base.model_copy(update={"model": teacher})


def student_prompts(model, teacher: TeacherConfig) -> dict[str, str]:
    """The student's own `query` / `document` prompts (sentence-transformers `prompts`) when it carries them,
    else the teacher's: a LEAF student learns from the same prompted texts the teacher embedded."""
    own = getattr(model, "prompts", None) or {}
    return {kind: own.get(kind, teacher.prompt_for(kind)) for kind in ("query", "document")}


def build_sources(student: str, teacher: TeacherConfig, cache_root, models: ModelStore,
                  batch_size: int = 64) -> dict[str, VectorSource]:
    """Teacher (through the teacher cache under `cache_root`: a local path, URI or leaf_ray.storage.StoragePath)
    and student (encoded directly), both loaded from `models`. A student that is the teacher's own model with
    the same prompts shares the teacher's source, so its texts are not encoded twice; only for the transformers
    backend, since a vLLM or endpoint teacher's vectors come from another engine (and its model may not be local)."""
    model = models.load(student)
    prompts = student_prompts(model, teacher)
    teacher_source = TeacherCacheSource(teacher, cache_root, models)
    same_model = teacher.backend == "transformers" and models.resolve(student) == models.resolve(teacher.model)
    if same_model and prompts == {k: teacher.prompt_for(k) for k in prompts}:
        log.info("student %s is the teacher's model with the teacher's prompts: sharing its vectors", student)
        return {"teacher": teacher_source, "student": teacher_source}
    return {"teacher": teacher_source, "student": sentence_transformer_source(model, prompts, batch_size)}
