"""The teacher-vector cache: parquet parts + a manifest under
`<cache_root>/teacher/<teacher fingerprint>/<data fingerprint>/`, on a local disk or an object store
(leaf_ray.storage).

Rows are split into fixed chunks (the unit of resume): part-NNNNN.parquet holds chunk NNNNN and is
written atomically (temp file + rename locally, one whole-object upload on an object store), so an
interrupted run leaves only whole parts behind and a rerun computes just the chunks that are missing or
damaged. Reading streams part by part from wherever the cache is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.config import TeacherConfig
from leaf_ray.storage import StoragePath, resolve

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Teacher settings that change the vectors; anything else (pool size, batch size) does not.
# `backend_options` holds the vLLM / endpoint settings that change vectors (never a URL or an API key);
# it is None for the transformers backend and then left out, so those fingerprints are unchanged.
SPEC_FIELDS = ("model", "backend", "query_prompt", "document_prompt", "max_length", "normalize", "dtype",
               "cache_dtype", "backend_options")


class CacheMismatchError(ValueError):
    """A cache that belongs to another teacher, dimension or data set."""


class CacheDamagedError(RuntimeError):
    """A part file is unreadable or holds the wrong number of rows."""


def teacher_spec(cfg: TeacherConfig) -> dict:
    return {name: value for name in SPEC_FIELDS if (value := getattr(cfg, name)) is not None}


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    spec = teacher_spec(cfg)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.model.rstrip("/").split("/")[-1])
    return f"{slug}-{digest}"


def _read_manifest(manifest_file) -> dict:
    """The manifest's JSON. One that is not valid JSON (cut off by a crash outside leaf-ray's atomic writes) is
    refused naming its file; the parts beside it are left as they are."""
    try:
        return json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise CacheDamagedError(f"{manifest_file}: not valid JSON ({exc}); move it away and rerun the teacher stage "
                                "to rebuild the cache") from exc


class TeacherCache:
    """One teacher's vectors for one data set; see the module docstring for the layout. `location` is
    where it lives; `path` the same as a Path when local (else its URI)."""

    def __init__(self, path: Path | str | StoragePath, manifest: dict):
        self.location = resolve(path, "teacher cache")
        self.manifest = manifest

    @property
    def path(self) -> Path | str:
        return self.location.native()

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str | StoragePath, teacher: TeacherConfig, data_fingerprint: str, rows: int,
             chunk_rows: int) -> TeacherCache:
        """Open (or start) the cache at `path`, refusing one written for another teacher or data set."""
        path = resolve(path, "teacher cache")
        spec = teacher_spec(teacher)
        manifest_file = path / MANIFEST
        if manifest_file.is_file():
            manifest = _read_manifest(manifest_file)
            if manifest.get("teacher") != spec:
                diff = {k: (manifest.get("teacher", {}).get(k), v) for k, v in spec.items()
                        if manifest.get("teacher", {}).get(k) != v}
                raise CacheMismatchError(f"cache {path} was written by another teacher: (cached, configured) = {diff}")
            # chunk_rows is layout, not content: an existing cache keeps its own.
            for key, want in (("data_fingerprint", data_fingerprint), ("rows", rows)):
                if manifest.get(key) != want:
                    raise CacheMismatchError(f"cache {path}: manifest {key}={manifest.get(key)!r}, expected {want!r}")
            return cls(path, manifest)
        path.check_writable("storage.cache_root")  # a read-only root fails here, before any teacher work
        manifest = {"teacher": spec, "data_fingerprint": data_fingerprint, "rows": rows, "chunk_rows": chunk_rows,
                    "chunks": -(-rows // chunk_rows), "dim": None, "normalized": teacher.normalize,
                    "dtype": teacher.cache_dtype, "complete": False, "created": time.time()}
        cache = cls(path, manifest)
        cache._save_manifest()
        return cache

    @classmethod
    def load(cls, path: Path | str | StoragePath) -> TeacherCache:
        """Open a finished cache for reading; refuses an incomplete or damaged one."""
        path = resolve(path, "teacher cache")
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise CacheDamagedError(f"no teacher cache at {path} (missing {MANIFEST})")
        cache = cls(path, _read_manifest(manifest_file))
        if not cache.manifest.get("complete"):
            raise CacheDamagedError(f"teacher cache {path} is incomplete; rerun the teacher stage to finish it")
        damaged = [i for i in range(cache.chunks) if not cache.chunk_ok(i)]
        if damaged:
            raise CacheDamagedError(f"teacher cache {path}: parts {damaged[:10]} are missing or damaged")
        return cache

    # -- properties --------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self.manifest.get("dim")

    @property
    def chunks(self) -> int:
        return self.manifest["chunks"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def chunk_rows_of(self, index: int) -> int:
        return min(self.manifest["chunk_rows"], self.manifest["rows"] - index * self.manifest["chunk_rows"])

    def part_location(self, index: int) -> StoragePath:
        return self.location / f"part-{index:05d}.parquet"

    def part_path(self, index: int) -> Path | str:
        return self.part_location(index).native()

    # -- integrity -------------------------------------------------------------------------------
    def chunk_ok(self, index: int) -> bool:
        """A part counts only if its footer reads and it holds exactly its chunk's rows, as vectors of the
        cache's dimension and dtype (a part of another width would otherwise pass and break, or feed, training)."""
        part = self.part_location(index)
        if not part.is_file():
            return False
        try:
            meta = pq.read_metadata(part.path, filesystem=part.filesystem)
            vectors = meta.schema.to_arrow_schema().field("embedding").type
        except (pa.ArrowInvalid, OSError, KeyError):
            return False
        return (meta.num_rows == self.chunk_rows_of(index) and pa.types.is_fixed_size_list(vectors)
                and vectors.value_type == pa.from_numpy_dtype(np.dtype(self.manifest["dtype"]))
                and self.dim in (None, vectors.list_size))

    def missing_chunks(self, on_damaged: str = "recompute") -> list[int]:
        missing = []
        for index in range(self.chunks):
            if self.chunk_ok(index):
                continue
            if self.part_location(index).exists():
                if on_damaged == "error":
                    raise CacheDamagedError(f"teacher cache part {self.part_path(index)} is damaged or has the "
                                            f"wrong row count (expected {self.chunk_rows_of(index)})")
                log.warning("teacher cache part %s is damaged; recomputing it", self.part_path(index))
            missing.append(index)
        return missing

    # -- writing -------------------------------------------------------------------------------
    def set_dim(self, dim: int) -> None:
        if self.dim is not None and self.dim != dim:
            raise CacheMismatchError(f"cache {self.location} holds {self.dim}-d vectors but the teacher now returns "
                                     f"{dim}-d; use a new cache_root or delete the cache")
        if self.dim is None:
            self.manifest["dim"] = dim
            self._save_manifest()

    def write_chunk(self, index: int, ids: list, texts: list, kinds: list, vectors: np.ndarray) -> None:
        if len(ids) != self.chunk_rows_of(index):
            raise CacheDamagedError(f"chunk {index}: got {len(ids)} rows, expected {self.chunk_rows_of(index)}")
        dtype = np.float16 if self.manifest["dtype"] == "float16" else np.float32
        flat = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
        table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                          "kind": pa.array(kinds, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        buffer = pa.BufferOutputStream()  # serialised whole first: the part is written in one atomic call
        pq.write_table(table, buffer)
        self.part_location(index).write_bytes(buffer.getvalue())

    def finish(self, stats: dict) -> None:
        self.manifest.update(complete=True, finished=time.time(), last_run=stats)
        self._save_manifest()

    def _save_manifest(self) -> None:
        (self.location / MANIFEST).write_text(json.dumps(self.manifest, indent=2))

    # -- reading -------------------------------------------------------------------------------
    def parts(self) -> list[StoragePath]:
        return [self.part_location(i) for i in range(self.chunks)]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """The whole cache (id, text, kind, embedding, or just `columns`) in row order."""
        return pa.concat_tables([pq.read_table(part.path, columns=columns, filesystem=part.filesystem)
                                 for part in self.parts()])

    def embeddings(self) -> np.ndarray:
        """All vectors as a (rows, dim) float32 array, in row order."""
        return embedding_matrix(self.read_table(["embedding"]).column("embedding"))

    def dataset(self):
        """The cache as a Ray Dataset read in parallel from its parts; `embedding` arrives in numpy
        batches as a (rows, dim) float32 matrix rather than an array of per-row arrays."""
        import ray

        return ray.data.read_parquet([part.path for part in self.parts()], filesystem=self.location.filesystem,
                                     ).map_batches(_embeddings_as_matrix, batch_format="numpy")


def _embeddings_as_matrix(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data reads a fixed-size-list column as an object array of rows; stack it once here."""
    batch["embedding"] = embedding_matrix(batch["embedding"])
    return batch


def embedding_matrix(values) -> np.ndarray:
    """A (rows, dim) float32 array from teacher vectors as they arrive: an arrow (fixed-size) list column,
    a numpy matrix, or a numpy object array of per-row vectors (Ray Data's form of a list column)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if pa.types.is_fixed_size_list(values.type):
            return values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(values), -1)
        values = values.to_numpy(zero_copy_only=False)
    values = np.asarray(values)
    return (np.stack(values) if values.dtype == object and len(values) else values).astype(np.float32, copy=False)

