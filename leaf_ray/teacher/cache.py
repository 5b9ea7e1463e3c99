"""The teacher-vector cache: parquet parts + a manifest under
`<cache_root>/teacher/<teacher fingerprint>/<data fingerprint>/`, on a local disk or an object store
(leaf_ray.storage).

Rows are split into chunks by a hash of their id (leaf_ray.teacher.chunks), the unit of resume:
part-NNNNN.parquet holds exactly chunk NNNNN's rows and is written atomically by whichever teacher actor
embedded it (temp file + rename locally, one whole-object upload on an object store), with the digest of its
rows in its parquet footer. The manifest lists every chunk's row count and digest, so a part counts only if its
footer matches; an interrupted run leaves only whole parts behind and a rerun computes just the chunks that are
missing or damaged. Rows within a part are in a hash order, so every part is a random sample of the mix and
training can stream the parts in any order. Reading streams part by part from wherever the cache is.
Caches of one teacher share their rows: chunk counts are powers of two, so a row of a grown or changed mix lies in
one known part of each other cache, and the teacher stage copies it from there instead of embedding it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leaf_ray.config import TeacherConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.hashing import CHUNKING, id_hashes, row_digests, set_digest
from leaf_ray.runtime import DATA_TASK_CPUS
from leaf_ray.storage import StoragePath, resolve
from leaf_ray.teacher.chunks import ChunkPlan

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Teacher settings that change the vectors; anything else (pool size, batch size) does not.
# `backend_options` holds the vLLM / endpoint settings that change vectors (never a URL or an API key);
# it is None for the transformers backend and then left out, so those fingerprints are unchanged.
DIGEST_KEY = b"leaf_ray.rows_digest"  # a part's footer entry: the set_digest of the rows it holds
CHECK_THREADS = 16  # parts whose footers are checked at once (object stores answer each with a round trip)
SPEC_FIELDS = ("model", "backend", "query_prompt", "document_prompt", "max_length", "normalize", "dtype",
               "cache_dtype", "backend_options")


class CacheMismatchError(LeafRayError, ValueError):
    """A cache that belongs to another teacher, dimension or data set."""


class CacheDamagedError(LeafRayError, RuntimeError):
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
    def open(cls, path: Path | str | StoragePath, teacher: TeacherConfig, plan: ChunkPlan,
             chunk_rows: int) -> TeacherCache:
        """Open (or start) the cache at `path` for the rows `plan` describes, refusing one written for another
        teacher, data set or chunk layout."""
        path = resolve(path, "teacher cache")
        spec = teacher_spec(teacher)
        manifest_file = path / MANIFEST
        if manifest_file.is_file():
            manifest = _read_manifest(manifest_file)
            if manifest.get("teacher") != spec:
                diff = {k: (manifest.get("teacher", {}).get(k), v) for k, v in spec.items()
                        if manifest.get("teacher", {}).get(k) != v}
                raise CacheMismatchError(f"cache {path} was written by another teacher: (cached, configured) = {diff}")
            if manifest.get("chunking") != CHUNKING:
                raise CacheMismatchError(f"cache {path} uses an older part layout ({manifest.get('chunking')!r}); "
                                         "delete it or use a new storage.cache_root")
            # chunk_rows is layout, not content: an existing cache keeps its own chunk count (the caller plans
            # with it: existing_chunks).
            for key, want in (("data_fingerprint", plan.fingerprint), ("rows", plan.rows)):
                if manifest.get(key) != want:
                    raise CacheMismatchError(f"cache {path}: manifest {key}={manifest.get(key)!r}, expected {want!r}")
            if manifest.get("chunk_digests") != plan.digests:
                raise CacheMismatchError(f"cache {path}: the manifest's chunk digests are not those of the data")
            return cls(path, manifest)
        path.check_writable("storage.cache_root")  # a read-only root fails here, before any teacher work
        manifest = {"teacher": spec, "data_fingerprint": plan.fingerprint, "rows": plan.rows, "chunk_rows": chunk_rows,
                    "chunks": plan.chunks, "chunking": CHUNKING, "dim": None, "normalized": teacher.normalize,
                    "dtype": teacher.cache_dtype, "complete": False, "created": time.time(),
                    "chunk_sizes": plan.sizes, "chunk_digests": plan.digests}
        cache = cls(path, manifest)
        cache._save_manifest()
        return cache

    @staticmethod
    def existing_chunks(path: Path | str | StoragePath) -> int | None:
        """The chunk count of a cache already at `path` (its layout), or None."""
        manifest_file = resolve(path, "teacher cache") / MANIFEST
        manifest = _read_manifest(manifest_file) if manifest_file.is_file() else {}
        return manifest.get("chunks") if manifest.get("chunking") == CHUNKING else None

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
        return self.manifest["chunk_sizes"][index]

    def part_location(self, index: int) -> StoragePath:
        return self.location / f"part-{index:05d}.parquet"

    def part_path(self, index: int) -> Path | str:
        return self.part_location(index).native()

    # -- integrity -------------------------------------------------------------------------------
    def chunk_ok(self, index: int) -> bool:
        """A part counts only if its footer reads and holds exactly its chunk's rows (their digest), as vectors of
        the cache's dimension and dtype (a part of another width would otherwise pass and break, or feed,
        training). An empty chunk has no part."""
        if self.chunk_rows_of(index) == 0:
            return True
        footer = self._footer(index)
        if footer is None:
            return False
        meta, vectors = footer
        return (meta.num_rows == self.chunk_rows_of(index)
                and (meta.metadata or {}).get(DIGEST_KEY, b"").decode() == self.manifest["chunk_digests"][index]
                and pa.types.is_fixed_size_list(vectors)
                and vectors.value_type == pa.from_numpy_dtype(np.dtype(self.manifest["dtype"]))
                and self.dim in (None, vectors.list_size))

    def _footer(self, index: int):
        """(parquet metadata, embedding type) of part `index`, or None when there is no readable part."""
        part = self.part_location(index)
        if not part.is_file():
            return None
        try:
            meta = pq.read_metadata(part.path, filesystem=part.filesystem)
            return meta, meta.schema.to_arrow_schema().field("embedding").type
        except (pa.ArrowInvalid, OSError, KeyError):
            return None

    def part_width(self, index: int) -> int | None:
        """The vector width in part `index`'s footer (None: no readable part)."""
        footer = self._footer(index)
        return footer[1].list_size if footer and pa.types.is_fixed_size_list(footer[1]) else None

    def adopt_dim(self) -> None:
        """Take the width of the first part that holds its chunk's rows when the manifest has none yet: actors write
        parts before the driver records the width, so a run killed in between leaves parts and no `dim`."""
        if self.dim is not None:
            return
        for index in range(self.chunks):
            if self.chunk_rows_of(index) and self.chunk_ok(index):
                self.set_dim(self.part_width(index))
                return

    def missing_chunks(self, on_damaged: str = "recompute") -> list[int]:
        """Chunks without a part that counts; footers are checked in parallel (one round trip each on a bucket)."""
        with ThreadPoolExecutor(CHECK_THREADS) as pool:
            ok = list(pool.map(self.chunk_ok, range(self.chunks)))
        missing = []
        for index in (i for i, good in enumerate(ok) if not good):
            if self.part_location(index).exists():
                if on_damaged == "error":
                    raise CacheDamagedError(f"teacher cache part {self.part_path(index)} is damaged or does not hold "
                                            f"its chunk's {self.chunk_rows_of(index)} rows")
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
        """Write chunk `index`'s part in one atomic call, refusing rows that are not exactly the chunk's. Rows are
        stored in the order of a hash of their id: a random order, the same on every rerun."""
        digest = set_digest(len(ids), row_digests(ids, texts, kinds).sum(axis=0))
        if len(ids) != self.chunk_rows_of(index) or digest != self.manifest["chunk_digests"][index]:
            raise CacheDamagedError(f"chunk {index}: got {len(ids)} rows that are not the chunk's "
                                    f"{self.chunk_rows_of(index)} rows")
        order = np.argsort(id_hashes(ids), kind="stable")
        dtype = np.float16 if self.manifest["dtype"] == "float16" else np.float32
        flat = pa.array(np.ascontiguousarray(np.asarray(vectors)[order], dtype=dtype).reshape(-1))
        table = pa.table({"id": pa.array(ids, pa.string()).take(order), "text": pa.array(texts, pa.string()).take(order),
                          "kind": pa.array(kinds, pa.string()).take(order),
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        buffer = pa.BufferOutputStream()  # serialised whole first: the part is written in one atomic call
        pq.write_table(table.replace_schema_metadata({DIGEST_KEY: digest.encode()}), buffer)
        self.part_location(index).write_bytes(buffer.getvalue())

    def finish(self, stats: dict) -> None:
        self.manifest.update(complete=True, finished=time.time(), last_run=stats)
        self._save_manifest()

    def _save_manifest(self) -> None:
        (self.location / MANIFEST).write_text(json.dumps(self.manifest, indent=2))

    # -- reuse across caches ------------------------------------------------------------------------
    def others(self) -> list[TeacherCache]:
        """The other caches of this teacher (other text mixes under the same teacher fingerprint) that hold
        vectors of this width and layout, largest first: where a grown or changed mix finds rows already embedded."""
        found = []
        for folder in self.location.parent.list():
            manifest_file = folder / MANIFEST
            if folder.name == self.location.name or not manifest_file.is_file():
                continue
            try:
                manifest = _read_manifest(manifest_file)
            except CacheDamagedError:
                continue
            if (manifest.get("teacher") == self.manifest["teacher"] and manifest.get("chunking") == CHUNKING
                    and manifest.get("dim") is not None and self.dim in (None, manifest["dim"])):
                found.append(TeacherCache(folder, manifest))
        return sorted(found, key=lambda cache: -cache.manifest["rows"])

    def lookup(self, ids: list, texts: list, kinds: list) -> tuple[np.ndarray, np.ndarray]:
        """(positions, vectors) of the rows this cache holds with the same id, text and kind. Only the parts the
        rows' chunks point to are read (one, when chunk counts nest); an unreadable part is skipped."""
        chunk = (id_hashes(ids) % np.uint64(self.chunks)).astype(np.int64)
        positions, vectors = [], []
        for index in np.unique(chunk).tolist():
            part, rows = self.part_location(index), np.flatnonzero(chunk == index).tolist()
            try:  # the ids first: most parts of an unrelated cache (an evaluation corpus) share none
                if not pc.is_in(pq.read_table(part.path, columns=["id"], filesystem=part.filesystem).column("id"),
                                pa.array([ids[i] for i in rows], pa.string())).to_numpy(zero_copy_only=False).any():
                    continue
                table = pq.read_table(part.path, filesystem=part.filesystem)
            except (pa.ArrowInvalid, OSError):
                continue
            held = {row: i for i, row in enumerate(zip(*(table.column(c).to_pylist() for c in ("id", "text", "kind"))))}
            hits = [(i, held[key]) for i in rows if (key := (ids[i], texts[i], kinds[i])) in held]
            if hits:
                mine, theirs = zip(*hits)
                positions.append(np.array(mine, dtype=np.int64))
                vectors.append(embedding_matrix(table.column("embedding").take(pa.array(theirs))))
        if not positions:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim or 0), dtype=np.float32)
        return np.concatenate(positions), np.concatenate(vectors)

    # -- reading -------------------------------------------------------------------------------
    def parts(self) -> list[StoragePath]:
        """Every part, in chunk order (empty chunks have none)."""
        return [self.part_location(i) for i in range(self.chunks) if self.chunk_rows_of(i)]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """The whole cache (id, text, kind, embedding, or just `columns`) in one table: for small caches (an
        evaluation corpus); training streams the parts with `dataset()`."""
        tables = [pq.read_table(part.path, columns=columns, filesystem=part.filesystem) for part in self.parts()]
        if tables:
            return pa.concat_tables(tables)
        empty = pa.schema([("id", pa.string()), ("text", pa.string()), ("kind", pa.string()),
                           ("embedding", pa.list_(pa.float32(), self.dim or 0))])
        return empty.empty_table().select(columns or empty.names)

    def vectors_for(self, ids: list[str]) -> np.ndarray:
        """The vectors of `ids` (each cached) in that order: for small caches, as read_table."""
        cached = self.read_table(["id", "embedding"])
        position = {row_id: i for i, row_id in enumerate(cached.column("id").to_pylist())}
        index = np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))
        return embedding_matrix(cached.column("embedding"))[index]

    def embeddings(self) -> np.ndarray:
        """All vectors as a (rows, dim) float32 array, in the cache's order (by chunk, then by id hash)."""
        return embedding_matrix(self.read_table(["embedding"]).column("embedding"))

    def dataset(self, shuffle_seed: int | None = None):
        """The cache as a Ray Dataset read in parallel from its parts; `embedding` arrives in numpy batches as a
        (rows, dim) float32 matrix rather than an array of per-row arrays. With `shuffle_seed` the parts are read
        in a seeded order that changes with every execution (each training epoch), streaming, with no barrier."""
        import ray

        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
        parts = ray.data.read_parquet([part.path for part in self.parts()], filesystem=self.location.filesystem,
                                      shuffle=shuffle, num_cpus=DATA_TASK_CPUS)
        return parts.map_batches(_embeddings_as_matrix, batch_format="numpy", num_cpus=DATA_TASK_CPUS)


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

