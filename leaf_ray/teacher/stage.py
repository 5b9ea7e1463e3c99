"""The Ray Data teacher stage: an autoscaling pool of teacher actors embeds `{id, text, kind}` rows.

`embed_dataset` is the lazy stage (streamed straight into training, or consumed by `build_cache`);
`build_cache` runs it over only the chunks a cache is missing and writes each chunk atomically as
soon as all of its rows are back, so an interruption loses at most the chunks in flight.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from leaf_ray.config import TeacherConfig
from leaf_ray.data import fingerprint_table, to_dataset
from leaf_ray.storage import DEFAULT_LOCAL_CACHE, StoragePath, resolve
from leaf_ray.teacher.backends import make_backend
from leaf_ray.teacher.cache import TeacherCache, embedding_matrix, teacher_fingerprint

log = logging.getLogger(__name__)
# Rows per actor call = this many teacher forward batches: big enough to amortise Ray overhead,
# small enough to keep every actor of a pool busy.
FORWARD_BATCHES_PER_CALL = 4


class TeacherEmbedder:
    """Ray Data callable class: loads the teacher once per actor, embeds each batch by kind."""

    def __init__(self, teacher: TeacherConfig, cache_root: str, allow_hub: bool = False):
        self.backend = make_backend(teacher, cache_root, allow_hub)

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


def embed_dataset(ds, teacher: TeacherConfig, cache_root: str | Path, allow_hub: bool = False):
    """Lazily add an `embedding` column (and `truncated` counts) to a Ray Dataset of text rows.
    `cache_root` is the local directory where actors find (or reassemble) model weights."""
    import ray

    placement = {}  # only when set: steers actors to a GPU model / node pool on heterogeneous clusters
    if teacher.accelerator_type:
        placement["accelerator_type"] = teacher.accelerator_type
    if teacher.resources_per_actor:
        placement["resources"] = dict(teacher.resources_per_actor)
    return ds.map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={"teacher": teacher, "cache_root": str(cache_root), "allow_hub": allow_hub},
        batch_size=teacher.batch_size * FORWARD_BATCHES_PER_CALL,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=teacher.min_actors, max_size=teacher.max_actors),
        num_cpus=teacher.num_cpus_per_actor,
        num_gpus=teacher.num_gpus_per_actor,
        **placement,
    )


def cache_location_for(table: pa.Table, teacher: TeacherConfig,
                       cache_root: str | Path | StoragePath) -> tuple[StoragePath, str]:
    data_fp = fingerprint_table(table)
    return resolve(cache_root, "cache_root") / "teacher" / teacher_fingerprint(teacher) / data_fp, data_fp


def cache_path_for(table: pa.Table, teacher: TeacherConfig, cache_root: str | Path) -> tuple[Path | str, str]:
    """Where `table`'s cache lives: a Path under a local cache_root, else its URI."""
    location, data_fp = cache_location_for(table, teacher, cache_root)
    return location.native(), data_fp


def build_cache(table: pa.Table, teacher: TeacherConfig, cache_root: str | Path | StoragePath,
                allow_hub: bool = False, model_root: str | Path | None = None) -> TeacherCache:
    """Return a complete teacher cache for `table`'s rows, computing only the chunks not yet cached.

    cache_root: a local directory, a storage URI or a resolved StoragePath (object stores included).
    model_root: the local directory for model weights; None: cache_root when local, else ~/.cache/leaf-ray.
    A complete cache is returned without loading the teacher. `cache.manifest["last_run"]` records
    how many chunks/rows this call computed and reused.
    """
    path, data_fp = cache_location_for(table, teacher, cache_root)
    if model_root is None:
        root = resolve(cache_root, "cache_root")
        model_root = root.native() if root.is_local else DEFAULT_LOCAL_CACHE.expanduser()
    cache = TeacherCache.open(path, teacher, data_fp, len(table), teacher.chunk_rows)
    missing = cache.missing_chunks(teacher.on_damaged_cache)
    started = time.time()
    if not missing:
        if not cache.complete:
            cache.finish({"chunks_computed": 0, "rows_computed": 0, "chunks_reused": cache.chunks})
        log.info("teacher cache %s is complete (%d rows); reusing it", path, len(table))
        return cache
    chunk_rows = cache.manifest["chunk_rows"]
    row = np.arange(len(table))
    todo = table.append_column("row", pa.array(row)).append_column("chunk", pa.array(row // chunk_rows))
    todo = todo.filter(pc.is_in(todo.column("chunk"), pa.array(missing)))
    stats = {"chunks_computed": len(missing), "rows_computed": len(todo), "chunks_reused": cache.chunks - len(missing)}
    stats |= _embed_chunks(cache, todo, missing, teacher, model_root, allow_hub, started)
    cache.finish(stats)
    log.info("teacher cache %s: %s", path, stats)
    return cache


def _embed_chunks(cache: TeacherCache, todo: pa.Table, missing: list[int], teacher: TeacherConfig,
                  model_root, allow_hub: bool, started: float) -> dict:
    """Stream the stage's output and write every chunk the moment its last row arrives.

    Returns timing stats: `first_output_s` (start-up: pool scheduling + teacher load + first batch)
    and `steady_rows_per_s` (rows after the first batch over the time after it).
    """
    pending: dict[int, list[dict]] = {i: [] for i in missing}
    received = dict.fromkeys(missing, 0)
    truncated, first = 0, None
    ds = embed_dataset(to_dataset(todo, cache.manifest["chunk_rows"]), teacher, model_root, allow_hub)
    with tqdm(total=len(todo), desc=f"teacher {teacher.model}", unit="text") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            vectors = np.asarray(batch["embedding"], dtype=np.float32)
            cache.set_dim(vectors.shape[1])
            truncated += int(batch["truncated"].sum())
            for chunk in np.unique(batch["chunk"]):
                rows = batch["chunk"] == chunk
                pending[chunk].append({k: batch[k][rows] for k in ("row", "id", "text", "kind")}
                                      | {"embedding": vectors[rows]})
                received[chunk] += int(rows.sum())
                if received[chunk] == cache.chunk_rows_of(chunk):
                    _write_sorted(cache, int(chunk), pending.pop(chunk))
            bar.update(len(vectors))
            first = first or (time.time(), len(vectors))
    if pending:
        raise RuntimeError(f"teacher stage ended with chunks {sorted(pending)[:10]} incomplete")
    end = time.time()
    steady_s = end - first[0]
    return {"truncated_texts": truncated, "seconds": round(end - started, 3),
            "first_output_s": round(first[0] - started, 3),
            "steady_rows_per_s": round((len(todo) - first[1]) / steady_s, 2) if steady_s > 0 else None}


def _write_sorted(cache: TeacherCache, chunk: int, pieces: list[dict]) -> None:
    """Write a chunk in the input's row order (actors may return its batches in any order)."""
    column = {k: np.concatenate([p[k] for p in pieces]) for k in ("row", "id", "text", "kind", "embedding")}
    order = np.argsort(column["row"], kind="stable")
    cache.write_chunk(chunk, [str(v) for v in column["id"][order]], [str(v) for v in column["text"][order]],
                      [str(v) for v in column["kind"][order]], column["embedding"][order])


def teacher_embeddings(table: pa.Table, teacher: TeacherConfig, cache_root: str | Path | StoragePath,
                       allow_hub: bool = False, model_root: str | Path | None = None) -> np.ndarray:
    """Teacher vectors for `table`'s rows in `table`'s order, through the cache (ids must be unique);
    `cache_root` and `model_root` as for build_cache."""
    rows = table.select(["id", "text", "kind"])
    ordered = rows.append_column("_len", pc.utf8_length(rows.column("text"))).sort_by(
        [("kind", "ascending"), ("_len", "ascending"), ("id", "ascending")]).drop(["_len"])
    cached = build_cache(ordered, teacher, cache_root, allow_hub, model_root).read_table(["id", "embedding"])
    position = {row_id: i for i, row_id in enumerate(cached.column("id").to_pylist())}
    index = np.fromiter((position[i] for i in table.column("id").to_pylist()), dtype=np.int64, count=len(table))
    return embedding_matrix(cached.column("embedding"))[index]
