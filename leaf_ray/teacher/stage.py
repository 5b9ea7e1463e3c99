"""The Ray Data teacher stage: an autoscaling pool of teacher actors embeds `{id, text, kind}` rows.

`embed_dataset` is the lazy stage streamed straight into training. `build_cache` groups the rows by cache chunk
and has the actors embed each missing chunk and write its part themselves, atomically: the driver plans and
counts but never holds a text or a vector, and an interruption loses at most the chunks in flight.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leaf_ray.config import TeacherConfig
from leaf_ray.models import ModelStore
from leaf_ray.progress import Progress, quiet_library_bars
from leaf_ray.storage import DEFAULT_LOCAL_CACHE, StoragePath, resolve
from leaf_ray.teacher.backends import make_backend
from leaf_ray.teacher.cache import CacheMismatchError, TeacherCache, teacher_fingerprint
from leaf_ray.teacher.chunks import ChunkPlan, chunk_count, plan_dataset, plan_table, task_shuffled, with_chunk

log = logging.getLogger(__name__)
# Rows per actor call = this many teacher forward batches: big enough to amortise Ray overhead,
# small enough to keep every actor of a pool busy.
FORWARD_BATCHES_PER_CALL = 4
TABLE_BLOCK_ROWS = 1024  # an in-memory table becomes Ray Data blocks of this many rows
# Groups of chunks (one actor task each) of the chunk sort: at most this many, and at least one per actor of the
# pool. A retried task skips the parts it already wrote.
WRITE_PARTITIONS = 200
# The sort cuts each of its P input blocks into P pieces. Ray keeps a task's small returns (under 100 KiB by
# default) in the memory of the process that owns them, here the driver: pieces of this many rows stay above
# that, so the texts go through the object store, never through the driver.
SORT_PIECE_ROWS = 4096


class TeacherEmbedder:
    """Ray Data callable class: loads the teacher once per actor (at its first batch, so that a model that cannot
    load fails a task, whose error reaches the driver as raised, not an actor's creation), embeds each batch by
    kind."""

    def __init__(self, teacher: TeacherConfig, models: ModelStore):
        self.options, self.loaded = (teacher, models), None

    @property
    def backend(self):
        if self.loaded is None:
            quiet_library_bars()
            self.loaded = make_backend(*self.options)
        return self.loaded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        kinds = np.asarray(batch["kind"]).astype(str)
        vectors = np.empty((len(texts), self.backend.dim), dtype=np.float32)
        truncated = 0
        for kind in np.unique(kinds):
            rows = np.flatnonzero(kinds == kind)
            group = [texts[i] for i in rows]
            vectors[rows] = self.backend.embed(group, str(kind))
            truncated += self.backend.count_truncated(group, str(kind))
        return {**batch, "embedding": vectors, "truncated": _spread(truncated, len(texts))}


def _spread(count: int, rows: int) -> np.ndarray:
    """Per-row truncation counts whose sum is the batch's count (Ray Data outputs are per row)."""
    out = np.zeros(rows, dtype=np.int64)
    if rows:
        out[0] = count
    return out


def embed_dataset(ds, teacher: TeacherConfig, models: ModelStore):
    """Lazily add an `embedding` column (and `truncated` counts) to a Ray Dataset of text rows; the actors load
    the teacher from `models`."""
    import ray

    return raising_teacher_errors(ds).map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={"teacher": teacher, "models": models},
        batch_size=teacher.batch_size * FORWARD_BATCHES_PER_CALL,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=teacher.min_actors, max_size=teacher.max_actors),
        num_cpus=teacher.num_cpus_per_actor,
        num_gpus=teacher.num_gpus_per_actor,
        **_placement(teacher),
    )


def raising_teacher_errors(ds):
    """`ds` (and what is made from it) re-raising a teacher's own error on the driver (a model not found, a
    wrong-width or NaN output) instead of Ray Data's UserCodeException around it, so a job can report it."""
    ds.context.raise_original_map_exception = True
    return ds


def _placement(teacher: TeacherConfig) -> dict:
    """Ray options that steer teacher actors to a GPU model / node pool on heterogeneous clusters (only when set)."""
    placement = {}
    if teacher.accelerator_type:
        placement["accelerator_type"] = teacher.accelerator_type
    if teacher.resources_per_actor:
        placement["resources"] = dict(teacher.resources_per_actor)
    return placement


def as_dataset(texts):
    """A Ray Dataset of text rows; an in-memory table (an evaluation corpus, a test) is put in the object store."""
    import ray

    if not isinstance(texts, pa.Table):
        return texts
    return ray.data.from_arrow([texts.slice(i, TABLE_BLOCK_ROWS) for i in range(0, len(texts), TABLE_BLOCK_ROWS)]
                               or [texts])


def plan_for(texts, teacher: TeacherConfig, cache_root: str | Path | StoragePath) -> tuple[StoragePath, ChunkPlan]:
    """Where the cache of `texts` (a Ray Dataset, or a table planned in-process) lives and how its rows split into
    chunks. A cache already there keeps its own chunk count, so changing `teacher.chunk_rows` never invalidates it."""
    def plan(chunks: int) -> ChunkPlan:
        return plan_table(texts, chunks) if isinstance(texts, pa.Table) else plan_dataset(texts, chunks)

    rows = len(texts) if isinstance(texts, pa.Table) else texts.count()
    found = plan(chunk_count(rows, teacher.chunk_rows))
    location = resolve(cache_root, "cache_root") / "teacher" / teacher_fingerprint(teacher) / found.fingerprint
    existing = TeacherCache.existing_chunks(location)
    return location, (plan(existing) if existing not in (None, found.chunks) else found)


def cache_path_for(texts, teacher: TeacherConfig, cache_root: str | Path) -> Path | str:
    """Where the cache of `texts` lives: a Path under a local cache_root, else its URI."""
    return plan_for(texts, teacher, cache_root)[0].native()


class CacheWriter:
    """Ray Data callable class over blocks sorted by chunk: embeds each whole chunk and writes its cache part
    itself, so no vector passes through the driver. Yields one small row per chunk as soon as its part is written,
    for the driver's progress and checks: a block holding many chunks of a slow teacher streams its records
    instead of staying silent until its last chunk (which Ray Data would stop as a stalled dataset). Each record is
    stamped with the time its chunk was done, which times the stage."""

    def __init__(self, teacher: TeacherConfig, cache: TeacherCache, models: ModelStore,
                 others: list[TeacherCache]):
        self.embedder = TeacherEmbedder(teacher, models)
        self.cache, self.batch_size = cache, teacher.batch_size * FORWARD_BATCHES_PER_CALL
        self.others = others

    def __call__(self, block: pa.Table) -> Iterator[pa.Table]:
        chunks = block.column("chunk").to_numpy()
        starts = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]])
        for start, stop in zip(starts, [*starts[1:], len(chunks)]):
            yield self.write(int(chunks[start]), block.slice(start, stop - start))

    def write(self, chunk: int, rows: pa.Table) -> pa.Table:
        if self.cache.chunk_ok(chunk):  # written by an earlier try of this task
            return pa.table({"chunk": [chunk], "rows": [len(rows)], "dim": [self.cache.part_width(chunk)],
                             "written": [True], "truncated": [0], "copied": [0], "done_at": [time.time()]})
        # Sorted by kind and length, so each forward batch has one prompt and little padding.
        rows = rows.append_column("_len", pc.utf8_length(rows.column("text"))).sort_by(
            [("kind", "ascending"), ("_len", "ascending")])
        columns = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in ("id", "text", "kind")}
        lists = [columns[name].tolist() for name in ("id", "text", "kind")]
        pieces = self.copied(*lists)  # (row positions, vectors) pairs
        copied = sum(len(where) for where, _ in pieces)
        todo = np.ones(len(rows), dtype=bool)
        for where, _ in pieces:
            todo[where] = False
        todo, truncated = np.flatnonzero(todo), 0
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            out = self.embedder({name: column[batch] for name, column in columns.items()})
            pieces.append((batch, out["embedding"]))
            truncated += int(out["truncated"].sum())
        dim = pieces[-1][1].shape[1]
        if any(piece.shape[1] != dim for _, piece in pieces):
            raise CacheMismatchError(f"chunk {chunk}: the teacher returns {dim}-d vectors but another cache of the "
                                     f"same teacher settings under {self.cache.location.parent} holds "
                                     f"{pieces[0][1].shape[1]}-d ones; delete the stale cache")
        vectors = np.empty((len(rows), dim), dtype=np.float32)
        for where, piece in pieces:
            vectors[where] = piece
        written = self.cache.dim in (None, dim)  # else the driver refuses the teacher (set_dim), writing nothing
        if written:
            self.cache.write_chunk(chunk, *lists, vectors)
        return pa.table({"chunk": [chunk], "rows": [len(rows)], "dim": [dim], "written": [written],
                         "truncated": [truncated], "copied": [copied], "done_at": [time.time()]})

    def copied(self, ids: list, texts: list, kinds: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """The rows other caches of this teacher already hold (a grown or changed mix), as (row positions, vectors)
        pairs: copied, not embedded again."""
        pieces, left = [], np.arange(len(ids))
        for other in self.others:
            if not len(left):
                break
            where, vectors = other.lookup(*([values[i] for i in left] for values in (ids, texts, kinds)))
            if len(where):
                pieces.append((left[where], vectors))
                left = np.setdiff1d(left, left[where])
        return pieces


def build_cache(texts, teacher: TeacherConfig, cache_root: str | Path | StoragePath,
                models: ModelStore | None = None) -> TeacherCache:
    """Return a complete teacher cache for `texts` (a Ray Dataset of text rows, or a table), computing only the
    chunks not yet cached.

    The rows are sorted by chunk with a Ray Data sort; each chunk goes to a teacher actor that embeds it and
    writes its part, and the driver sees one small record per chunk.
    cache_root: a local directory, a storage URI or a resolved StoragePath (object stores included).
    models: where the actors load the teacher from; None: weights under cache_root when it is local, else under
    ~/.cache/leaf-ray, and no Hub.
    A complete cache is returned without loading the teacher. `cache.manifest["last_run"]` records
    how many chunks/rows this call computed and reused.
    """
    started = time.time()
    path, plan = plan_for(texts, teacher, cache_root)
    if models is None:
        root = resolve(cache_root, "cache_root")
        models = ModelStore(root.native() if root.is_local else DEFAULT_LOCAL_CACHE.expanduser())
    cache = TeacherCache.open(path, teacher, plan, teacher.chunk_rows)
    cache.adopt_dim()
    missing = cache.missing_chunks(teacher.on_damaged_cache)
    if not missing:
        if not cache.complete:
            cache.finish({"chunks_computed": 0, "rows_computed": 0, "chunks_reused": cache.chunks})
        log.info("teacher cache %s is complete (%d rows); reusing it", path.native(), plan.rows)
        return cache
    todo_rows = sum(plan.sizes[i] for i in missing)
    stats = {"chunks_computed": len(missing), "rows_computed": todo_rows,
             "chunks_reused": cache.chunks - len(missing)}
    stats |= _write_missing_parts(cache, texts, missing, todo_rows, teacher, models, started)
    cache.finish(stats)
    log.info("teacher cache %s: %s", path.native(), stats)
    return cache


def _write_missing_parts(cache: TeacherCache, texts, missing: list[int], todo_rows: int, teacher: TeacherConfig,
                         models: ModelStore, started: float) -> dict:
    """Run the teacher pool over the missing chunks and check each chunk's record as it arrives.

    Returns timing stats from the times the actors finished each chunk: `first_output_s` (start-up: planning,
    grouping, pool scheduling, teacher load and the first chunk) and `steady_rows_per_s` (rows after the first
    chunk over the time from it to the last).
    """
    import ray

    partitions = write_partitions(len(missing), todo_rows, teacher.max_actors)
    todo = task_shuffled(as_dataset(texts).map_batches(
        _keep_chunks, fn_kwargs={"chunks": cache.chunks, "keep": missing}, batch_format="pyarrow"))
    # Sorted (a sort shuffle makes as many blocks as it gets) and materialised before the pool starts: the sort's
    # tasks never wait for CPUs that teacher actors hold. A chunk's rows land in one block.
    grouped = todo.repartition(partitions).sort("chunk").materialize()
    # Whole blocks (whole chunks) per call: the public map_batches refuses batch_size=None with GPUs, so this is
    # the DeveloperAPI that Ray's own groupby().map_groups uses for the same purpose.
    records = raising_teacher_errors(grouped).map_batches_internal(
        CacheWriter, batch_size=None,
        fn_constructor_kwargs={"teacher": teacher, "cache": cache, "models": models, "others": cache.others()},
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=teacher.min_actors, max_size=teacher.max_actors),
        num_cpus=teacher.num_cpus_per_actor, num_gpus=teacher.num_gpus_per_actor, **_placement(teacher))
    truncated, copied, done, finished = 0, 0, set(), []
    with Progress(todo_rows, f"teacher {teacher.model}") as bar:
        for record in records.iter_rows():
            cache.set_dim(record["dim"])  # refuses a teacher whose width changed, before anything is counted
            if record["rows"] != cache.chunk_rows_of(record["chunk"]) or record["chunk"] in done:
                raise RuntimeError(f"teacher stage: chunk {record['chunk']} came back with {record['rows']} rows "
                                   f"(expected {cache.chunk_rows_of(record['chunk'])}, once)")
            done.add(record["chunk"])
            truncated += record["truncated"]
            copied += record["copied"]
            bar.update(record["rows"])
            finished.append((record["done_at"], record["rows"]))
    if len(done) != len(missing):
        raise RuntimeError(f"teacher stage ended with chunks {sorted(set(missing) - done)[:10]} not written")
    (first_at, first_rows), last_at = min(finished), max(finished)[0]
    steady_s = last_at - first_at
    return {"truncated_texts": truncated, "rows_copied": copied, "seconds": round(time.time() - started, 3),
            "first_output_s": round(first_at - started, 3),
            "steady_rows_per_s": round((todo_rows - first_rows) / steady_s, 2) if steady_s > 0 else None}


def write_partitions(chunks: int, rows: int, actors: int) -> int:
    """How many groups of chunks the sort makes: one per actor at least, more while each of the sort's
    partitions^2 pieces keeps SORT_PIECE_ROWS rows, never more than the chunks or WRITE_PARTITIONS."""
    return max(1, min(chunks, WRITE_PARTITIONS, max(actors, math.isqrt(rows // SORT_PIECE_ROWS))))


def _keep_chunks(batch: pa.Table, chunks: int, keep: list[int]) -> pa.Table:
    """The rows of `batch` whose chunk is in `keep`, with their `chunk` column."""
    keyed = with_chunk(batch.select(["id", "text", "kind"]), chunks)
    return keyed.filter(pc.is_in(keyed.column("chunk"), pa.array(keep, pa.int64())))


def teacher_embeddings(table: pa.Table, teacher: TeacherConfig, cache_root: str | Path | StoragePath,
                       models: ModelStore | None = None) -> np.ndarray:
    """Teacher vectors for `table`'s rows in `table`'s order, through the cache (ids must be unique);
    `cache_root` and `models` as for build_cache."""
    cache = build_cache(table.select(["id", "text", "kind"]), teacher, cache_root, models)
    return cache.vectors_for(table.column("id").to_pylist())
