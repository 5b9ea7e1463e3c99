"""Text sources (jsonl, jsonl.gz, parquet, BEIR folders) read as Ray Datasets of `{id, text, kind}` rows.

Why this shape: at the paper's scale the driver must never hold the texts, so every file becomes Ray read
tasks (a plain .jsonl is split into byte ranges, a parquet file into row-group ranges, a .gz file is one task
since gzip cannot seek). Each row also carries its position (`_src` = index of the source in the config,
`_pos` = byte offset of its line, or parquet row) so "first occurrence" means the same thing whatever the
block boundaries and parallelism. Bad input is never raised inside a worker (Ray hands the driver only a
traceback's text): a read task stops at its first bad line and emits one `_error` row, and the driver raises
the earliest one as DataError naming the file, 1-based line (or 0-based parquet row) and field.

`parse_json_lines` is the one parser for every JSON-lines path (Ray read tasks and the driver-side
`read_jsonl` / `read_beir_corpus` that evaluation uses on small corpora), and is pure so it can be fuzzed
without Ray.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from leaf_ray.config import DataConfig, DataSource
from leaf_ray.errors import LeafRayError

KINDS = ("query", "document")
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("kind", pa.string())])
# What read tasks emit: the text row plus where it came from (`_src`, `_pos`), its sampling key, whether its
# text is empty or whitespace-only, and `_error` (set on the one row a failed read task emits instead).
READ_SCHEMA = pa.schema([*SCHEMA, ("_src", pa.int32()), ("_pos", pa.int64()), ("_key", pa.uint64()),
                         ("_empty", pa.bool_()), ("_error", pa.string())])
# _pos = part << 40 | offset: a BEIR folder's corpus (part 0) comes before its queries (part 1), and the files of
# a path pattern come in name order.
PART_SHIFT = 40
CHUNK_BYTES = 64 << 20  # plain .jsonl files are read in byte ranges of about this size
BLOCK_ROWS = 50_000  # rows per block a read task emits
_GZ_PIECE = 8 << 20

# Every character Python's str.isspace() accepts (so str.strip() removes): a text of only these is "empty",
# exactly as `not text.strip()` says, but tested on whole Arrow columns with one RE2 match.
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                 "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_BLANK_RE = "^[" + "".join(f"\\x{{{ord(c):04x}}}" for c in PY_WHITESPACE) + "]*$"


class DataError(LeafRayError, ValueError):
    """Bad input data; the message names the file, line/row and field."""

    def __init__(self, message: str, offset: int = 0):
        super().__init__(message)
        self.offset = offset  # where in the file (byte offset or row) the problem is: orders errors


@dataclass(frozen=True)
class Fields:
    """How one file's JSON objects / parquet columns become text rows."""

    id_field: str | None = "id"  # None (parquet only): ids are the row numbers, after id_prefix
    text_field: str = "text"
    kind_field: str = "kind"
    kind: str | None = None  # every row gets this kind (the kind field is not read)
    id_prefix: str = ""  # BEIR: "doc:" / "query:"
    title_field: str | None = None  # BEIR corpus: text becomes "title text"


@dataclass
class ParsedLines:
    ids: list
    texts: list
    kinds: list
    offsets: list  # byte offset of each row's line, from the start of the buffer


# ---------------------------------------------------------------------------------------------- JSON lines

def parse_json_lines(data: bytes, fields: Fields, path: str, *, at_file_start: bool = True,
                     line_of: Callable[[int], int] = lambda index: index + 1) -> ParsedLines:
    """Rows of a buffer of whole JSON lines. Blank lines are skipped; anything else is a row or a DataError
    naming `path`, the 1-based line (`line_of(index of the line in the buffer)`) and the field, with the
    line's byte offset in the buffer as `offset`. A UTF-8 BOM is tolerated at the start of the file."""
    out = ParsedLines([], [], [], [])
    offset = 0
    for index, raw in enumerate(data.split(b"\n")):
        start, offset = offset, offset + len(raw) + 1
        if not raw:
            continue
        try:
            line = raw.decode("utf-8-sig" if at_file_start and index == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{line_of(index)}: not valid UTF-8 ({exc.reason} at byte {exc.start})",
                            start) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise DataError(f"{path}:{line_of(index)}: malformed JSON ({reason})", start) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_of(index)}: expected a JSON object, got {type(obj).__name__}", start)
        try:
            row_id, text, kind = _row(obj, fields, b"\\u" in raw)
        except DataError as exc:
            raise DataError(f"{path}:{line_of(index)}: {exc}", start) from None
        out.ids.append(row_id)
        out.texts.append(text)
        out.kinds.append(kind)
        out.offsets.append(start)
    return out


def _row(obj: dict, fields: Fields, escapes: bool) -> tuple[str, str, str]:
    for name in (fields.id_field, fields.text_field):
        if obj.get(name) is None:
            raise DataError(f"missing field '{name}'")
    raw_id, text = obj[fields.id_field], obj[fields.text_field]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise DataError(f"field '{fields.id_field}' must be a string or an integer, got {type(raw_id).__name__}")
    if not isinstance(text, str):
        raise DataError(f"field '{fields.text_field}' must be a string, got {type(text).__name__}")
    if fields.title_field is not None:
        title = obj.get(fields.title_field) or ""
        if not isinstance(title, str):
            raise DataError(f"field '{fields.title_field}' must be a string, got {type(title).__name__}")
        text = f"{title.strip()} {text}".strip()
    kind = fields.kind or obj.get(fields.kind_field)
    if not isinstance(kind, str) or kind not in KINDS:
        raise DataError(f"field '{fields.kind_field}' must be one of {KINDS} (got {kind!r}); "
                        "set the source's `kind` to assign one")
    row_id = fields.id_prefix + str(raw_id)
    if escapes:  # only a \u escape can make a lone surrogate, which no UTF-8 column can hold
        for name, value in ((fields.id_field, row_id), (fields.text_field, text)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"field '{name}' holds a lone surrogate escape (not valid Unicode)") from None
    return row_id, text, kind


def _gz_pieces(stream, path: str) -> Iterator[tuple[bytes, int]]:
    """(whole lines, number of lines before them) of a gzip stream, piece by piece; a truncated or damaged
    file is a DataError naming the file and the last whole line read."""
    lines = consumed = 0
    rest = b""
    counted = _Counting(stream)
    try:
        with gzip.GzipFile(fileobj=counted, mode="rb") as handle:
            while True:
                piece = handle.read(_GZ_PIECE)
                if not piece:
                    break
                cut = piece.rfind(b"\n")
                if cut < 0:
                    rest += piece
                    continue
                whole, rest = rest + piece[: cut + 1], piece[cut + 1:]
                yield whole, lines
                lines += whole.count(b"\n")
                consumed += len(whole)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise DataError(f"{path}: unreadable after line {lines} ({type(exc).__name__}: {exc})", consumed) from None
    if not counted.total:  # gzip reads nothing from an empty file, without complaint
        raise DataError(f"{path}: an empty file, not gzip data", 0)
    if rest:
        yield rest, lines


class _Counting:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream):
        self.stream, self.total = stream, 0

    def read(self, size=-1):
        data = self.stream.read(size)
        self.total += len(data)
        return data

def _read_lines_local(path: Path, fields: Fields) -> ParsedLines:
    """A whole (small) JSON-lines file, parsed on the driver."""
    out = ParsedLines([], [], [], [])
    with open(path, "rb") as handle:
        pieces = _gz_pieces(handle, str(path)) if _is_gz(str(path)) else [(handle.read(), 0)]
        for data, first in pieces:
            part = parse_json_lines(data, fields, str(path), at_file_start=first == 0,
                                    line_of=lambda index, first=first: first + index + 1)
            out.ids += part.ids
            out.texts += part.texts
            out.kinds += part.kinds
    return out


def read_jsonl(path: Path, id_field: str = "id", text_field: str = "text", kind_field: str = "kind",
               default_kind: str | None = None) -> list[tuple[str, str, str]]:
    """Read (id, text, kind) triples on the driver (small evaluation files); errors name the file, 1-based
    line and field."""
    rows = _read_lines_local(Path(path), Fields(id_field, text_field, kind_field, default_kind))
    return list(zip(rows.ids, rows.texts, rows.kinds))


def read_beir_corpus(folder: Path) -> list[tuple[str, str, str]]:
    """Corpus documents as (id, "title text", "document"), the form BEIR and MTEB encode."""
    rows = _read_lines_local(Path(folder) / "corpus.jsonl", BEIR_CORPUS)
    return list(zip(rows.ids, rows.texts, rows.kinds))


BEIR_CORPUS = Fields("_id", "text", kind="document", title_field="title")
BEIR_QUERIES = Fields("_id", "text", kind="query")


def _is_gz(name: str) -> bool:
    return name.endswith(".gz")


# ---------------------------------------------------------------------------------------------- locations

@dataclass(frozen=True)
class Location:
    """A file or folder, local or in an object store; `name` is how errors show it. Picklable."""

    filesystem: pafs.FileSystem
    path: str
    name: str

    def child(self, name: str) -> Location:
        return Location(self.filesystem, f"{self.path.rstrip('/')}/{name}", f"{self.name.rstrip('/')}/{name}")

    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)


def locate(source: DataSource, cfg: DataConfig) -> Location:
    """A source's path: absolute, under the data root (or the Hugging Face dataset it mirrors), hf://datasets/...,
    or an s3:// / gs:// URI (also as the data root)."""
    from leaf_ray.storage import resolve

    raw_root = cfg.root or os.environ.get("LEAF_DATA_DIR") or ""
    uri = None
    if "://" in source.path and not source.path.startswith("hf://"):
        uri = source.path
    elif "://" in raw_root and not Path(source.path).is_absolute():
        uri = f"{raw_root.rstrip('/')}/{source.path}"
    if uri is not None:
        where = resolve(uri, f"data source '{source.label}'")
        return Location(where.filesystem, where.path, where.uri)
    try:
        path = cfg.resolve_path(source.path)  # an absolute path is returned as it is, missing or not
    except DataError as exc:
        raise DataError(f"data source '{source.label}': {exc}") from None
    return Location(pafs.LocalFileSystem(), os.path.abspath(path), str(path))


# ---------------------------------------------------------------------------------------------- read tasks

@dataclass(frozen=True)
class ReadPlan:
    """One read task: a byte range of a plain JSON-lines file, a whole .gz file, or parquet row groups."""

    where: Location
    kind: str  # "lines" | "gz" | "parquet"
    fields: Fields
    src: int
    part: int
    sample_key: str | None  # hash key of the source's sampling (None: the source has no limits)
    start: int = 0  # lines: byte range; parquet: row-group range
    end: int = 0
    first_row: int = 0  # parquet: index of the first row of the range in the file


def sample_hash_key(seed: int, label: str) -> str:
    """The 16-character siphash key of one source's seeded sampling."""
    return hashlib.blake2b(f"{seed}\x00{label}".encode(), digest_size=8).hexdigest()


def plan_source(source: DataSource, src: int, cfg: DataConfig, chunk_bytes: int = CHUNK_BYTES) -> list[ReadPlan]:
    """The read tasks of one source, checked on the driver: the path exists, the format is known, a parquet
    file has the columns it needs. A path with a glob pattern (`train-*.parquet`) is its files in name order."""
    where = locate(source, cfg)
    if not has_pattern(where.path):
        return _plan_file(source, where, src, cfg, 0, chunk_bytes)
    local = isinstance(where.filesystem, pafs.LocalFileSystem)
    files = sorted(f for f in glob.glob(where.path) if os.path.isfile(f)) if local else []
    if not files:
        raise DataError(f"data source '{source.label}': {where.name} matches no file (patterns need a local "
                        "or hf:// path)")
    # id-less rows are named by their file below the pattern's fixed folder (pqa_a/train.parquet, pqa_b/...)
    fixed = os.path.dirname(where.path[:min(i for i, c in enumerate(where.path) if c in "*?[")])
    return [plan for part, file in enumerate(files)
            for plan in _plan_file(source, Location(where.filesystem, file, file), src, cfg, part, chunk_bytes,
                                   row_names=f"{source.label}:{os.path.relpath(file, fixed)}:")]


def has_pattern(path: str) -> bool:
    return any(c in path for c in "*?[")


def _plan_file(source: DataSource, where: Location, src: int, cfg: DataConfig, part: int, chunk_bytes: int,
               row_names: str | None = None) -> list[ReadPlan]:
    """One file's (or BEIR folder's) read tasks; `part` orders a pattern's files, `row_names` is what rows of an
    id-less parquet file are named after (default: the source's label)."""
    info = where.info()
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data source '{source.label}': {where.name} does not exist "
                        f"(data root: {cfg.resolved_root()}; set data.root or LEAF_DATA_DIR)")
    fmt = source.format if source.format != "auto" else _detect_format(where, info)
    limited = source.limit is not None or source.limit_queries is not None or source.limit_documents is not None
    key = sample_hash_key(cfg.seed, source.label) if limited else None
    if fmt == "beir":
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{where.name}: a BEIR source must be a folder with corpus.jsonl and queries.jsonl")
        plans = []
        # Ids are prefixed with `doc:` / `query:` because BEIR reuses ids across the two files.
        for part, (name, fields) in enumerate((("corpus", replace(BEIR_CORPUS, id_prefix=f"{source.id_prefix}doc:")),
                                               ("queries", replace(BEIR_QUERIES,
                                                                   id_prefix=f"{source.id_prefix}query:")))):
            if name in source.beir_parts:
                file = where.child(f"{name}.jsonl")
                file_info = file.info()
                if file_info.type != pafs.FileType.File:
                    raise DataError(f"data source '{source.label}': {file.name} does not exist")
                plans += _plan_lines(file, file_info.size, fields, src, part, key, chunk_bytes)
        return plans
    if info.type != pafs.FileType.File:
        raise DataError(f"{where.name}: a {fmt} source must be a file")
    fields = Fields(source.id_field, source.text_field, source.kind_field, source.kind,
                    id_prefix=source.id_prefix + ("" if source.id_field else row_names or f"{source.label}:"))
    if fmt == "parquet":
        return _plan_parquet(where, fields, src, part, key)
    return _plan_lines(where, info.size, fields, src, part, key, chunk_bytes)


def _detect_format(where: Location, info: pafs.FileInfo) -> str:
    if info.type == pafs.FileType.Directory:
        if where.child("corpus.jsonl").info().type == pafs.FileType.File:
            return "beir"
        raise DataError(f"{where.name}: a directory source must be a BEIR folder with corpus.jsonl")
    if where.path.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if where.path.endswith(".parquet"):
        return "parquet"
    raise DataError(f"{where.name}: cannot tell the format from the name; set the source's `format`")


def _plan_lines(where, size, fields, src, part, key, chunk_bytes) -> list[ReadPlan]:
    if _is_gz(where.path):
        return [ReadPlan(where, "gz", fields, src, part, key)]
    bounds = list(range(0, size, max(chunk_bytes, 1))) + [size]
    return [ReadPlan(where, "lines", fields, src, part, key, a, b) for a, b in zip(bounds, bounds[1:])]


def _plan_parquet(where: Location, fields: Fields, src: int, part: int, key: str | None,
                  rows_per_task: int = 4 * BLOCK_ROWS) -> list[ReadPlan]:
    try:
        with where.filesystem.open_input_file(where.path) as handle:
            meta = pq.ParquetFile(handle).metadata
            names = set(meta.schema.to_arrow_schema().names)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{where.name}: not a readable parquet file ({exc})") from None
    for name in filter(None, (fields.id_field, fields.text_field)):
        if name not in names:
            raise DataError(f"{where.name}: missing column '{name}' (columns: {sorted(names)})")
    if fields.kind is None and fields.kind_field not in names:
        raise DataError(f"{where.name}: missing column '{fields.kind_field}'; set the source's `kind` to assign one")
    plans, group, first, rows = [], 0, 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= rows_per_task or g == meta.num_row_groups - 1:
            plans.append(ReadPlan(where, "parquet", fields, src, part, key, group, g + 1, first))
            group, first, rows = g + 1, first + rows, 0
    return plans


def run_plan(plan: ReadPlan, block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """Blocks of READ_SCHEMA rows; a bad row ends the task with one `_error` row instead."""
    try:
        if plan.kind == "parquet":
            yield from _run_parquet(plan, block_rows)
        else:
            yield from _run_lines(plan, block_rows)
    except DataError as exc:
        yield error_block(str(exc), plan.src, (plan.part << PART_SHIFT) + exc.offset)


def error_block(message: str, src: int, pos: int) -> pa.Table:
    return pa.table({"id": [""], "text": [""], "kind": [""], "_src": [src], "_pos": [pos], "_key": [0],
                     "_empty": [False], "_error": [message]}, schema=READ_SCHEMA)


def _run_lines(plan: ReadPlan, block_rows: int) -> Iterator[pa.Table]:
    fs, name = plan.where.filesystem, plan.where.name
    if plan.kind == "gz":
        with fs.open_input_stream(plan.where.path, compression=None) as stream:
            base = 0
            for data, first in _gz_pieces(stream, name):
                try:
                    rows = parse_json_lines(data, plan.fields, name, at_file_start=first == 0,
                                            line_of=lambda index, first=first: first + index + 1)
                except DataError as exc:
                    raise DataError(str(exc), base + exc.offset) from None
                yield from _blocks(rows, plan, base, block_rows)
                base += len(data)
        return
    with fs.open_input_file(plan.where.path) as handle:
        first, data = _byte_range(handle, plan.start, plan.end)
        try:
            rows = parse_json_lines(data, plan.fields, name, at_file_start=first == 0,
                                    line_of=lambda index: _line_number(handle, first) + index)
        except DataError as exc:
            raise DataError(str(exc), first + exc.offset) from None
    yield from _blocks(rows, plan, first, block_rows)


def _byte_range(handle, start: int, end: int) -> tuple[int, bytes]:
    """(offset, bytes) of the whole lines whose first byte lies in [start, end)."""
    size = handle.size()
    first = start
    handle.seek(start)
    data = handle.read(end - start)
    if start > 0:
        handle.seek(start - 1)
        if handle.read(1) != b"\n":  # the line at `start` began in the previous range
            cut = data.find(b"\n")
            if cut < 0:
                return end, b""
            first, data = start + cut + 1, data[cut + 1:]
    if data and not data.endswith(b"\n") and end < size:  # finish the last line, which runs past `end`
        handle.seek(end)
        tail = []
        while True:
            piece = handle.read(1 << 20)
            if not piece:
                break
            cut = piece.find(b"\n")
            if cut >= 0:
                tail.append(piece[: cut + 1])
                break
            tail.append(piece)
        data += b"".join(tail)
    return first, data


def _line_number(handle, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (only computed for an error message)."""
    handle.seek(0)
    count, left = 0, offset
    while left > 0:
        piece = handle.read(min(left, 16 << 20))
        if not piece:
            break
        count += piece.count(b"\n")
        left -= len(piece)
    return count + 1


def _blocks(rows: ParsedLines, plan: ReadPlan, base: int, block_rows: int) -> Iterator[pa.Table]:
    offsets = (plan.part << PART_SHIFT) + base + np.asarray(rows.offsets, dtype=np.int64)
    for i in range(0, len(rows.ids), block_rows):
        j = i + block_rows
        yield finish_block(pa.array(rows.ids[i:j], pa.string()), pa.array(rows.texts[i:j], pa.string()),
                           pa.array(rows.kinds[i:j], pa.string()), plan, offsets[i:j])


def finish_block(ids: pa.Array, texts: pa.Array, kinds: pa.Array, plan: ReadPlan, pos: np.ndarray) -> pa.Table:
    """A READ_SCHEMA block: adds the source, the position, the sampling key and the empty-text flag."""
    n = len(ids)
    key = sample_keys(ids, plan.sample_key) if plan.sample_key else np.zeros(n, dtype=np.uint64)
    return pa.table({"id": ids, "text": texts, "kind": kinds, "_src": pa.array(np.full(n, plan.src, np.int32)),
                     "_pos": pa.array(pos, pa.int64()), "_key": pa.array(key, pa.uint64()),
                     "_empty": blank(texts), "_error": pa.nulls(n, pa.string())}, schema=READ_SCHEMA)


def blank(texts) -> pa.Array:
    """True where `not text.strip()` (empty or whitespace-only), for a whole column at once."""
    return pc.match_substring_regex(texts, _BLANK_RE)


def sample_keys(ids, hash_key: str) -> np.ndarray:
    """A seeded 64-bit key per id (pandas' vectorised siphash): a source keeps the rows with the n smallest keys.
    Were pandas to change it, a limited source would sample other rows, so its mix (and cache address) would
    change: a cache miss, never a wrong cache."""
    from pandas.util import hash_array

    values = ids.to_numpy(zero_copy_only=False) if hasattr(ids, "to_numpy") else np.asarray(ids, dtype=object)
    return hash_array(values.astype(object), hash_key=hash_key, categorize=False)


def _run_parquet(plan: ReadPlan, block_rows: int) -> Iterator[pa.Table]:
    f, name = plan.fields, plan.where.name
    cols = [c for c in (f.id_field, f.text_field) if c] + ([] if f.kind else [f.kind_field])
    with plan.where.filesystem.open_input_file(plan.where.path) as handle:
        table = pq.ParquetFile(handle).read_row_groups(list(range(plan.start, plan.end)), columns=cols)
    first = plan.first_row
    for i in range(0, max(len(table), 1), block_rows):
        part = table.slice(i, block_rows)
        if not len(part):
            return
        ids, texts, kinds = _check_columns(part, f, name, first + i)
        rows = np.arange(first + i, first + i + len(part), dtype=np.int64)
        yield finish_block(ids, texts, kinds, plan, (plan.part << PART_SHIFT) + rows)


def _plain(column: pa.ChunkedArray) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array


def _check_columns(table: pa.Table, f: Fields, name: str, first: int) -> tuple[pa.Array, pa.Array, pa.Array]:
    """id, text and kind columns of parquet rows, checked as whole columns; the first bad row (in the order
    a row-by-row reader would meet it) is a DataError naming it."""
    n = len(table)
    texts = _plain(table.column(f.text_field))
    ids = _plain(table.column(f.id_field)) if f.id_field else pa.array(np.arange(first, first + n))
    bad = np.full(n, -1, dtype=np.int64)  # index of the first failing check per row (-1: none)
    messages = []

    def check(mask, message):
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            fresh = mask & (bad < 0)
            bad[fresh] = len(messages)
            messages.append(message)

    check(ids.is_null().to_numpy(zero_copy_only=False), lambda i: f"missing field '{f.id_field}'")
    check(texts.is_null().to_numpy(zero_copy_only=False), lambda i: f"missing field '{f.text_field}'")
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_string_view(ids.type)
            or pa.types.is_integer(ids.type)):
        check(np.ones(n, bool), lambda i: f"field '{f.id_field}' must be a string or an integer, "
                                           f"got {type(ids[i].as_py()).__name__}")
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
            or pa.types.is_string_view(texts.type)):
        check(np.ones(n, bool), lambda i: f"field '{f.text_field}' must be a string, "
                                           f"got {type(texts[i].as_py()).__name__}")
    if f.kind:
        kinds = pa.array(np.full(n, f.kind, dtype=object), pa.string())
    else:
        kinds = _plain(table.column(f.kind_field))
        if pa.types.is_string(kinds.type) or pa.types.is_large_string(kinds.type) or \
                pa.types.is_string_view(kinds.type):
            kinds = kinds.cast(pa.string())
            ok = pc.fill_null(pc.is_in(kinds, pa.array(KINDS)), False).to_numpy(zero_copy_only=False)
        else:
            ok = np.zeros(n, bool)
        check(~ok, lambda i: f"field '{f.kind_field}' must be one of {KINDS} (got {kinds[i].as_py()!r}); "
                             "set the source's `kind` to assign one")
    failing = np.flatnonzero(bad >= 0)
    if len(failing):
        i = int(failing[0])
        raise DataError(f"{name} row {first + i}: {messages[bad[i]](i)}", first + i)
    ids = ids.cast(pa.string())
    if f.id_prefix:
        ids = pc.binary_join_element_wise(f.id_prefix, ids, "")
    return ids, texts.cast(pa.string()), kinds
