"""The text mix on Ray Data: per-source seeded limits, empty-text and duplicate drops, and a MixReport.

Why it is built this way: the driver never holds the texts or ids, only small counts. Every step is a
vectorised (pyarrow / numpy) function over blocks:

- Limits: each row of a limited source has a key = siphash(seed, label; id). A source keeps the n rows with the
  smallest (key, position), found exactly by narrowing a 256-bucket histogram of the keys' top bits, pass by
  pass, until the boundary bucket is small enough to fetch its keys (not texts). The cut is a threshold, so it
  is the same whatever the block boundaries or parallelism. Per-kind limits are a second threshold over the
  rows of that kind; keeping the rows under both thresholds is exactly "sample `limit`, then `limit_queries`
  of what was sampled".
- Duplicates: rows are hash-partitioned by Ray Data (a groupby on a coarse bucket of the id's hash, then of the
  text's hash: few, large groups, so the per-group function runs a handful of times and sorts whole buckets),
  and inside a bucket the real strings are compared, so a hash collision never drops a row. "First" is the
  smallest (source index, position): the earlier source in `data.sources`, then the earlier line or row. As
  in the sequential rule this replaces, the first row of an id takes the id even when its text is then
  dropped as a repeat, and an empty-text row takes no id.
- Dropped rows stay in the data with a status (and no text) until the report is counted with one pass of
  per-block counts, then the mix is filtered to the kept rows and materialized.
The groupbys use Ray's task-based sort shuffle: on small mixes it starts in well under a second (the actor-based
hash shuffle spends seconds starting aggregators), and it scales to a cluster.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leaf_ray.config import DataConfig
from leaf_ray.data.sources import (BLOCK_ROWS, CHUNK_BYTES, KINDS, READ_SCHEMA, SCHEMA, DataError, ReadPlan,
                                   plan_source, run_plan)

ROWS_PER_PARTITION = 100_000  # rows per dedupe partition, roughly
BUCKETS_PER_PARTITION = 16  # hash buckets (groups) per partition
FETCH_KEYS = 50_000  # a limit's boundary bucket is fetched (keys and positions only) once this small
KEEP, EMPTY, DUP_ID, DUP_TEXT = 0, 1, 2, 3  # row status in the dedupe stages
_ALL, _NONE, _CUT = 0, 1, 2  # how a limit threshold keeps rows


@dataclass
class MixReport:
    """What happened to the input rows: nothing is dropped without being counted here."""

    read: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    dropped_empty: int = 0
    dropped_duplicate_text: int = 0
    dropped_duplicate_id: int = 0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


# ---------------------------------------------------------------------------------------------- reading

def _datasource(plans: list[ReadPlan], block_rows: int):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class TextSources(Datasource):
        """One read task per plan: per file, or per byte / row-group range of a splittable file."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(functools.partial(_read_task, plan, block_rows),
                             BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                           input_files=(plan.where.name,)), schema=READ_SCHEMA)
                    for plan in plans]

        def get_name(self):
            return "TextSources"

    return TextSources()


def _read_task(plan: ReadPlan, block_rows: int):
    yield from run_plan(plan, block_rows)


def read_sources(cfg: DataConfig, *, chunk_bytes: int = CHUNK_BYTES, block_rows: int = BLOCK_ROWS):
    """Every source of `cfg` as one lazy Ray Dataset of READ_SCHEMA rows (paths and formats are checked here,
    on the driver; bad rows come back as `_error` rows)."""
    import ray
    from ray.data.context import ShuffleStrategy

    plans = [plan for src, source in enumerate(cfg.sources) for plan in plan_source(source, src, cfg, chunk_bytes)]
    if not plans:
        raise DataError("the data mix is empty: no source has a file to read (check beir_parts)")
    # One read task per plan, none split further: a task's blocks are already `block_rows` long.
    ds = ray.data.read_datasource(_datasource(plans, block_rows), override_num_blocks=len(plans))
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # this dataset and those made from it
    return ds


def _small(ds) -> pa.Table:
    """A dataset of a few rows (counts, keys) as one table on the driver."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def _kind_index(kinds) -> np.ndarray:
    return pc.equal(kinds, KINDS[1]).to_numpy(zero_copy_only=False).astype(np.int64)  # query 0, document 1


def _np(column) -> np.ndarray:
    return column.to_numpy() if isinstance(column, pa.ChunkedArray) else np.asarray(column)


# ---------------------------------------------------------------------------------------------- per-block stats

_STATS = pa.schema([("rec", pa.int8()), ("a", pa.int64()), ("n", pa.int64()), ("pos", pa.int64()),
                    ("msg", pa.string())])


def _stats_table(rec, a, n, pos, msg) -> pa.Table:
    return pa.table({"rec": pa.array(rec, pa.int8()), "a": pa.array(a, pa.int64()), "n": pa.array(n, pa.int64()),
                     "pos": pa.array(pos, pa.int64()), "msg": pa.array(msg, pa.string())}, schema=_STATS)


def _read_stats(t: pa.Table) -> pa.Table:
    """Per block: the first read error (rec 1), and row counts per (source, kind, top 8 bits of the key)
    (rec 0)."""
    errors = pc.is_valid(t["_error"]).to_numpy(zero_copy_only=False)
    recs, a, n, pos, msg = [], [], [], [], []
    if errors.any():
        bad = t.filter(pa.array(errors))
        i = int(np.lexsort((_np(bad["_pos"]), _np(bad["_src"])))[0])
        recs, a, n, pos, msg = [1], [int(bad["_src"][i].as_py())], [0], [int(bad["_pos"][i].as_py())], \
            [bad["_error"][i].as_py()]
        t = t.filter(pa.array(~errors))
    code = (_np(t["_src"]).astype(np.int64) * 2 + _kind_index(t["kind"])) * 256 + \
        (_np(t["_key"]) >> np.uint64(56)).astype(np.int64)
    values, counts = np.unique(code, return_counts=True)
    k = len(values)
    return _stats_table(recs + [0] * k, a + values.tolist(), n + counts.tolist(), pos + [0] * k, msg + [None] * k)


# ---------------------------------------------------------------------------------------------- limits

@dataclass
class _Limit:
    src: int
    kind: int  # -1: all kinds (`limit`), else the kind index (`limit_queries` / `limit_documents`)
    rank: int  # keep rows up to this 1-based rank (in key order) within the current prefix
    prefix: int = 0  # top `bits` bits of the boundary key
    bits: int = 0
    matched: int = 0  # rows under the prefix
    mode: int = _ALL
    fetch: bool = False  # the next pass fetches the prefix's keys (decided on the driver)
    key: int = 0  # the threshold (key, position), inclusive, when mode is _CUT
    pos: int = 0


def _narrow(limit: _Limit, hist: np.ndarray) -> None:
    """Move the limit's prefix 8 bits down into the bucket holding its rank."""
    cum = np.cumsum(hist)
    bucket = int(np.searchsorted(cum, limit.rank, side="left"))
    limit.rank -= int(cum[bucket - 1]) if bucket else 0
    limit.prefix = (limit.prefix << 8) | bucket
    limit.bits += 8
    limit.matched = int(hist[bucket])


def _in_prefix(t: pa.Table, limit: _Limit):
    key = _np(t["_key"])
    mask = _np(t["_src"]) == limit.src
    if limit.kind >= 0:
        mask &= _kind_index(t["kind"]) == limit.kind
    if limit.bits:
        mask &= (key >> np.uint64(64 - limit.bits)) == np.uint64(limit.prefix)
    return mask, key


def _refine(t: pa.Table, limits: list[_Limit]) -> pa.Table:
    """Per block and pending limit: the keys and positions under its prefix (rec 2, when few enough), else the
    histogram of their next 8 bits (rec 3)."""
    t = t.filter(pc.invert(pc.is_valid(t["_error"])))
    recs, a, n, pos = [], [], [], []
    for index, limit in enumerate(limits):
        mask, key = _in_prefix(t, limit)
        if limit.fetch:
            k = int(mask.sum())
            recs += [2] * k
            a += [index] * k
            n += key[mask].view(np.int64).tolist()
            pos += _np(t["_pos"])[mask].tolist()
        else:
            values, counts = np.unique((key[mask] >> np.uint64(56 - limit.bits)) & np.uint64(255),
                                       return_counts=True)
            recs += [3] * len(values)
            a += [index * 256 + int(v) for v in values]
            n += counts.tolist()
            pos += [0] * len(values)
    return _stats_table(recs, a, n, pos, [None] * len(recs))


def _resolve_limits(read, cfg: DataConfig, hist: np.ndarray) -> list[_Limit]:
    """The exact threshold of every limit, in a few passes over `read` that return only keys and counts."""
    limits = []
    for src, source in enumerate(cfg.sources):
        for kind, n in ((-1, source.limit), (0, source.limit_queries), (1, source.limit_documents)):
            if n is None:
                continue
            counts = hist[src].sum(axis=0) if kind < 0 else hist[src, kind]
            limit = _Limit(src, kind, n)
            if n == 0:
                limit.mode = _NONE
            elif n < counts.sum():
                limit.mode = _CUT
                _narrow(limit, counts)
            limits.append(limit)
    pending = [limit for limit in limits if limit.mode == _CUT]
    while pending:
        for limit in pending:
            limit.fetch = limit.matched <= FETCH_KEYS or limit.bits >= 64
        out = _small(read.map_batches(_refine, fn_kwargs={"limits": pending}, batch_format="pyarrow",
                                      batch_size=None))
        rec, a, n, pos = (_np(out[c]) for c in ("rec", "a", "n", "pos")) if out is not None \
            else (np.zeros(0, np.int64),) * 4
        still = []
        for index, limit in enumerate(pending):
            if limit.fetch:
                mine = (rec == 2) & (a == index)
                keys, where = n[mine].view(np.uint64), pos[mine]
                order = np.lexsort((where, keys))
                at = order[limit.rank - 1]
                limit.key, limit.pos = int(keys[at]), int(where[at])
            else:
                hist_next = np.zeros(256, dtype=np.int64)
                mine = (rec == 3) & (a // 256 == index)
                np.add.at(hist_next, a[mine] % 256, n[mine])
                _narrow(limit, hist_next)
                still.append(limit)
        pending = still
    return limits


def _apply_limits(t: pa.Table, limits: list[_Limit], n_buckets: int) -> pa.Table:
    """The rows under every limit, as dedupe rows: status EMPTY for empty texts (text dropped), and the bucket
    of the id's hash."""
    t = t.filter(pc.invert(pc.is_valid(t["_error"])))
    keep = np.ones(len(t), dtype=bool)
    if limits and len(t):
        key, pos, src, kind = _np(t["_key"]), _np(t["_pos"]), _np(t["_src"]), _kind_index(t["kind"])
        for limit in limits:
            mine = src == limit.src
            if limit.kind >= 0:
                mine &= kind == limit.kind
            if limit.mode == _NONE:
                keep &= ~mine
            elif limit.mode == _CUT:
                tk = np.uint64(limit.key)
                keep &= ~mine | (key < tk) | ((key == tk) & (pos <= limit.pos))
        t = t.filter(pa.array(keep))
    empty = _np(t["_empty"]).astype(bool) if len(t) else np.zeros(0, bool)
    status = np.where(empty, EMPTY, KEEP).astype(np.int8)
    return pa.table({"id": t["id"], "text": pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), t["text"]),
                     "kind": t["kind"], "_src": t["_src"], "_pos": t["_pos"], "_status": pa.array(status),
                     "_b": pa.array(_bucket(t["id"], n_buckets))})


def _bucket(strings, n_buckets: int) -> np.ndarray:
    """A coarse hash bucket per string (the partition key of the dedupe groupbys)."""
    from pandas.util import hash_array

    if not len(strings):
        return np.zeros(0, dtype=np.int64)
    values = strings.to_numpy(zero_copy_only=False).astype(object)
    return (hash_array(values, categorize=False) % np.uint64(n_buckets)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- dedupe

def _repeats(t: pa.Table, active: np.ndarray, keys: list[str]) -> np.ndarray:
    """Indices (into `t`) of the active rows whose `keys` repeat an earlier active row, where earlier means
    a smaller (_src, _pos)."""
    if len(active) < 2:
        return np.zeros(0, dtype=np.int64)
    sub = t.take(pa.array(active)).select([*keys, "_src", "_pos"])
    order = pc.sort_indices(sub, sort_keys=[(k, "ascending") for k in (*keys, "_src", "_pos")]).to_numpy()
    same = np.ones(len(order) - 1, dtype=bool)
    for k in keys:
        column = sub[k].take(pa.array(order))
        same &= pc.equal(column.slice(1), column.slice(0, len(column) - 1)).to_numpy(zero_copy_only=False)
    return active[order[1:][same]]


def _mark(t: pa.Table, status: np.ndarray, rows: np.ndarray, code: int) -> tuple[pa.Table, np.ndarray]:
    if len(rows):
        status = status.copy()
        status[rows] = code
        dropped = np.zeros(len(t), dtype=bool)
        dropped[rows] = True
        t = t.set_column(t.schema.get_field_index("text"), "text",
                         pc.if_else(pa.array(dropped), pa.scalar(None, pa.string()), t["text"]))
    return t, status


def _first_ids(t: pa.Table, n_buckets: int, rebucket: bool) -> pa.Table:
    """One id bucket: a non-empty row whose id an earlier non-empty row holds becomes DUP_ID. Kept rows move
    to the bucket of their text's hash when texts are deduped next."""
    status = _np(t["_status"]).astype(np.int8)
    t, status = _mark(t, status, _repeats(t, np.flatnonzero(status == KEEP), ["id"]), DUP_ID)
    t = t.set_column(t.schema.get_field_index("_status"), "_status", pa.array(status))
    if rebucket:
        active = np.flatnonzero(status == KEEP)
        buckets = _np(t["_b"]).copy()
        buckets[active] = _bucket(t["text"].take(pa.array(active)), n_buckets)
        t = t.set_column(t.schema.get_field_index("_b"), "_b", pa.array(buckets))
    return t


def _first_texts(t: pa.Table) -> pa.Table:
    """One text bucket: a kept row whose (kind, text) an earlier kept row has becomes DUP_TEXT."""
    status = _np(t["_status"]).astype(np.int8)
    t, status = _mark(t, status, _repeats(t, np.flatnonzero(status == KEEP), ["kind", "text"]), DUP_TEXT)
    return t.set_column(t.schema.get_field_index("_status"), "_status", pa.array(status))


def _tag_stats(t: pa.Table) -> pa.Table:
    """Per block: rows per (status, kind) (rec 0), and the earliest EMPTY (rec 1) and DUP_ID (rec 2) row."""
    status, kind = _np(t["_status"]).astype(np.int64), _kind_index(t["kind"])
    values, counts = np.unique(status * 2 + kind, return_counts=True)
    recs, a, n, pos, msg = [0] * len(values), values.tolist(), counts.tolist(), [0] * len(values), \
        [None] * len(values)
    for rec, code in ((1, EMPTY), (2, DUP_ID)):
        rows = np.flatnonzero(status == code)
        if len(rows):
            src, where = _np(t["_src"])[rows], _np(t["_pos"])[rows]
            i = int(rows[np.lexsort((where, src))[0]])
            recs.append(rec)
            a.append(int(t["_src"][i].as_py()))
            n.append(0)
            pos.append(int(t["_pos"][i].as_py()))
            msg.append(t["id"][i].as_py())
    return _stats_table(recs, a, n, pos, msg)


def _kept(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(t["_status"], KEEP)).select(["id", "text", "kind"]).cast(SCHEMA)


def _first(stats: pa.Table, rec: int):
    """(src, pos, msg) of the earliest row of record type `rec`, or None."""
    rows = stats.filter(pc.equal(stats["rec"], rec))
    if not len(rows):
        return None
    i = int(np.lexsort((_np(rows["pos"]), _np(rows["a"])))[0])
    return int(rows["a"][i].as_py()), int(rows["pos"][i].as_py()), rows["msg"][i].as_py()


# ---------------------------------------------------------------------------------------------- the mix

def build_mix(cfg: DataConfig, *, chunk_bytes: int = CHUNK_BYTES, block_rows: int = BLOCK_ROWS):
    """Read every source as a Ray Dataset, apply per-source limits with seeded sampling, drop empty texts and
    duplicates, and return (a materialized Dataset of SCHEMA rows in no particular order, MixReport).
    `chunk_bytes` / `block_rows` size the read tasks and their blocks (they change nothing in the result).
    Ray must be initialised by the caller."""
    if not cfg.sources:
        raise DataError("data.sources is empty: name at least one text source")
    read = read_sources(cfg, chunk_bytes=chunk_bytes, block_rows=block_rows).materialize()

    stats = _small(read.map_batches(_read_stats, batch_format="pyarrow", batch_size=None))
    if stats is None:
        raise DataError("the data mix is empty after dropping empty texts and duplicates")
    error = _first(stats, 1)
    if error is not None:
        raise DataError(error[2])
    counts = stats.filter(pc.equal(stats["rec"], 0))
    hist = np.zeros((len(cfg.sources), 2, 256), dtype=np.int64)
    code = _np(counts["a"])
    np.add.at(hist, (code // 512, (code // 256) % 2, code % 256), _np(counts["n"]))
    report = MixReport()
    for src, source in enumerate(cfg.sources):
        report.read[source.label] = report.read.get(source.label, 0) + int(hist[src].sum())

    limits = _resolve_limits(read, cfg, hist)
    expected = sum(int(hist[src].sum()) for src in range(len(cfg.sources)))
    for limit in limits:
        if limit.kind < 0 and limit.mode != _ALL:
            expected -= int(hist[limit.src].sum()) - cfg.sources[limit.src].limit
    partitions = max(1, math.ceil(max(expected, 1) / ROWS_PER_PARTITION))
    n_buckets = partitions * BUCKETS_PER_PARTITION

    rows = read.map_batches(_apply_limits, fn_kwargs={"limits": limits, "n_buckets": n_buckets},
                            batch_format="pyarrow", batch_size=None)
    # The sort shuffle costs (input blocks x partitions): first gather the sampled rows into `partitions`
    # blocks (a split / merge, no shuffle), whatever the read's granularity.
    rows = rows.repartition(partitions).groupby("_b", num_partitions=partitions).map_groups(
        _first_ids, fn_kwargs={"n_buckets": n_buckets, "rebucket": cfg.dedupe_texts}, batch_format="pyarrow")
    if cfg.dedupe_texts:
        rows = rows.groupby("_b", num_partitions=partitions).map_groups(_first_texts, batch_format="pyarrow")
    tagged = rows.materialize()
    del read, rows  # the lazy plan holds the read's blocks: let the object store free them

    stats = _small(tagged.map_batches(_tag_stats, batch_format="pyarrow", batch_size=None))
    if stats is None:
        raise DataError("the data mix is empty after dropping empty texts and duplicates")
    found = []
    if cfg.empty_texts == "error" and (first := _first(stats, 1)) is not None:
        found.append((first[:2], f"row id {first[2]!r}: empty or whitespace-only text (data.empty_texts: error)"))
    if cfg.duplicate_ids == "error" and (first := _first(stats, 2)) is not None:
        found.append((first[:2], f"duplicate id {first[2]!r} in the data mix (set data.duplicate_ids: dedupe to "
                                 "keep the first occurrence)"))
    if found:
        raise DataError(min(found)[1])  # the one a row-by-row pass would meet first
    counts = stats.filter(pc.equal(stats["rec"], 0))
    by: dict[tuple[int, str], int] = {}
    for c, n in zip(_np(counts["a"]).tolist(), _np(counts["n"]).tolist()):
        by[(c // 2, KINDS[c % 2])] = by.get((c // 2, KINDS[c % 2]), 0) + n
    report.dropped_empty = sum(n for (status, _), n in by.items() if status == EMPTY)
    report.dropped_duplicate_id = sum(n for (status, _), n in by.items() if status == DUP_ID)
    report.dropped_duplicate_text = sum(n for (status, _), n in by.items() if status == DUP_TEXT)
    report.kept = {kind: by[(KEEP, kind)] for kind in KINDS if by.get((KEEP, kind))}
    if not report.kept:
        raise DataError("the data mix is empty after dropping empty texts and duplicates")
    mix = tagged.map_batches(_kept, batch_format="pyarrow", batch_size=None).materialize()
    return mix, report
