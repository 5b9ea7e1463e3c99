"""How a text mix splits into teacher-cache chunks, planned by Ray Data without gathering the rows.

A row's chunk is a hash of its id (leaf_ray.hashing), so a chunk is a uniform random sample of the mix whatever
the input order, and any node can tell which chunk a row is in. The plan holds, per chunk, its row count and the
order-independent digest of its rows: a cache part counts only if it holds exactly those rows, and the digest of
the whole mix is the data half of the cache's address. Planning is one distributed pass that sends the driver a
few numbers per block and chunk, never a text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from leaf_ray.hashing import DIGEST_PIECES, chunk_of, row_digests, set_digest

SUMS = [f"s{i}" for i in range(DIGEST_PIECES)]


@dataclass(frozen=True)
class ChunkPlan:
    rows: int
    sizes: list[int]  # rows per chunk
    digests: list[str]  # set_digest of each chunk's rows
    fingerprint: str  # set_digest of all rows: independent of the chunk count and of row order

    @property
    def chunks(self) -> int:
        return len(self.sizes)


def chunk_count(rows: int, chunk_rows: int) -> int:
    """Chunks of at most `chunk_rows` rows, as a power of two: then the chunks of two caches of one teacher nest
    (a row's chunk in the smaller count is its chunk in the larger one, modulo the smaller), so a grown or
    shrunk mix finds its rows already embedded in one part of the other cache (TeacherCache.lookup)."""
    return 1 << max(0, math.ceil(rows / chunk_rows) - 1).bit_length()


def with_chunk(batch: pa.Table, chunks: int) -> pa.Table:
    """`batch` with its rows' `chunk` column."""
    return batch.append_column("chunk", pa.array(chunk_of(batch.column("id").to_pylist(), chunks)))


def block_sums(batch: pa.Table, chunks: int) -> pa.Table:
    """Per chunk present in `batch`: its row count and summed row digests (one row per chunk, not per text)."""
    chunk = chunk_of(batch.column("id").to_pylist(), chunks)
    digests = row_digests(*(batch.column(c).to_pylist() for c in ("id", "text", "kind")))
    present, where = np.unique(chunk, return_inverse=True)
    sums = np.zeros((len(present), DIGEST_PIECES), dtype=np.int64)
    np.add.at(sums, where, digests)
    return pa.table({"chunk": present, "rows": np.bincount(where, minlength=len(present)).astype(np.int64),
                     **{name: sums[:, i] for i, name in enumerate(SUMS)}})


def _plan(partials: pa.Table, chunks: int) -> ChunkPlan:
    """Combine per-block partial sums (chunk, rows, s0..s3; a chunk may repeat) into the plan."""
    chunk = partials.column("chunk").to_numpy()
    rows = np.bincount(chunk, weights=partials.column("rows").to_numpy(), minlength=chunks).astype(np.int64)
    sums = np.zeros((chunks, DIGEST_PIECES), dtype=np.int64)
    np.add.at(sums, chunk, np.stack([partials.column(c).to_numpy() for c in SUMS], axis=1))
    return ChunkPlan(rows=int(rows.sum()), sizes=rows.tolist(),
                     digests=[set_digest(int(n), s) for n, s in zip(rows, sums)],
                     fingerprint=set_digest(int(rows.sum()), sums.sum(axis=0)))


def plan_table(table: pa.Table, chunks: int) -> ChunkPlan:
    """The plan of an in-memory table (small sets, tests); equal to plan_dataset's for the same rows."""
    return _plan(block_sums(table, chunks), chunks)


def task_shuffled(ds):
    """`ds` (and what is made from it) grouped by Ray Data's task-based sort shuffle. The hash shuffle runs
    aggregator actors that hold CPUs; next to a teacher pool on a small machine, or after a failed run whose
    aggregators are still going away, they can leave the stage waiting for a CPU that never frees."""
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds


def plan_dataset(texts, chunks: int) -> ChunkPlan:
    """The plan of a Ray Dataset of text rows: partial sums per block, combined by a Ray Data groupby, so the
    driver receives one small row per chunk."""
    import ray
    from ray.data.aggregate import Sum

    partials = task_shuffled(texts.map_batches(block_sums, fn_kwargs={"chunks": chunks}, batch_format="pyarrow",
                                               batch_size=None))
    combined = partials.groupby("chunk").aggregate(*(Sum(c, alias_name=c) for c in ["rows", *SUMS]))
    tables = [t.select(_PARTIAL_SCHEMA.names).cast(_PARTIAL_SCHEMA) for t in ray.get(combined.to_arrow_refs())
              if len(t)]
    return _plan(pa.concat_tables(tables) if tables else _PARTIAL_SCHEMA.empty_table(), chunks)


_PARTIAL_SCHEMA = pa.schema([("chunk", pa.int64()), ("rows", pa.int64()), *((c, pa.int64()) for c in SUMS)])
