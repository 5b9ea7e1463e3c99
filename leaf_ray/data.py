"""Text sources -> one seeded, deduplicated mix of `{id, text, kind}` rows -> a Ray Dataset.

The mix is assembled on the driver as a pyarrow table: it is only text (181k texts are ~30 MB), and
seeded sampling, dedupe and duplicate-id checks need a global view. The heavy work (the teacher) runs
on Ray Data actors over the table. Rows are sorted by (kind, length) so teacher batches hold texts of
similar length and one prompt: padding costs the teacher little.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.config import DataConfig, DataSource

KINDS = ("query", "document")
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("kind", pa.string())])


class DataError(ValueError):
    """Bad input data; the message names the file, line/row and field."""


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


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    return raw


def read_jsonl(path: Path, id_field: str = "id", text_field: str = "text", kind_field: str = "kind",
               default_kind: str | None = None) -> list[tuple[str, str, str]]:
    """Read (id, text, kind) triples; errors name the file, 1-based line and field."""
    rows = []
    for lineno, obj in _json_lines(path):
        rows.append(_row(obj, f"{path}:{lineno}", id_field, text_field, kind_field, default_kind))
    return rows


def _json_lines(path: Path):
    """(1-based line number, JSON object) per non-blank line; errors name the file and line."""
    lineno = 0
    try:
        with _open_text(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a leading BOM
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a truncated or damaged .gz
        raise DataError(f"{path}: unreadable after line {lineno} ({type(exc).__name__}: {exc})") from None


def _row(obj: dict, where: str, id_field: str, text_field: str, kind_field: str,
         default_kind: str | None) -> tuple[str, str, str]:
    for name in (id_field, text_field):
        if obj.get(name) is None:
            raise DataError(f"{where}: missing field '{name}'")
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' must be a string, got {type(text).__name__}")
    kind = default_kind or obj.get(kind_field)
    if kind not in KINDS:
        raise DataError(f"{where}: field '{kind_field}' must be one of {KINDS} (got {kind!r}); "
                        "set the source's `kind` to assign one")
    return str(obj[id_field]), text, kind


def read_parquet(path: Path, source: DataSource) -> list[tuple[str, str, str]]:
    table = pq.read_table(path)
    names = set(table.column_names)
    for name in (source.id_field, source.text_field):
        if name not in names:
            raise DataError(f"{path}: missing column '{name}' (columns: {sorted(names)})")
    if source.kind is None and source.kind_field not in names:
        raise DataError(f"{path}: missing column '{source.kind_field}'; set the source's `kind` to assign one")
    cols = [source.id_field, source.text_field] + ([] if source.kind else [source.kind_field])
    rows = []
    for index, obj in enumerate(table.select(cols).to_pylist()):
        rows.append(_row(obj, f"{path} row {index}", source.id_field, source.text_field, source.kind_field,
                         source.kind))
    return rows


def read_beir(folder: Path, parts: list[str]) -> list[tuple[str, str, str]]:
    """BEIR corpus rows become documents (title + text), queries become queries. Ids are prefixed
    with `doc:` / `query:` because BEIR reuses ids across the two files."""
    rows = []
    if "corpus" in parts:
        for doc_id, text, _ in read_beir_corpus(folder):
            rows.append((f"doc:{doc_id}", text, "document"))
    if "queries" in parts:
        for qid, text, _ in read_jsonl(folder / "queries.jsonl", "_id", "text", default_kind="query"):
            rows.append((f"query:{qid}", text, "query"))
    return rows


def read_beir_corpus(folder: Path) -> list[tuple[str, str, str]]:
    """Corpus documents as (id, "title text", "document"), the form BEIR and MTEB encode."""
    rows = []
    path = folder / "corpus.jsonl"
    for lineno, obj in _json_lines(path):
        for name in ("_id", "text"):
            if obj.get(name) is None:
                raise DataError(f"{path}:{lineno}: missing field '{name}'")
        title = (obj.get("title") or "").strip()
        rows.append((str(obj["_id"]), f"{title} {obj['text']}".strip(), "document"))
    return rows


def rows_to_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    """(id, text, kind) triples as a table in the text-row schema."""
    return pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "kind": [r[2] for r in rows]},
                    schema=SCHEMA)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return "beir"
        raise DataError(f"{path}: a directory source must be a BEIR folder with corpus.jsonl")
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the name; set the source's `format`")


def read_source(source: DataSource, cfg: DataConfig) -> list[tuple[str, str, str]]:
    path = cfg.resolve_path(source.path)
    if not path.exists():
        raise DataError(f"data source '{source.label}': {path} does not exist "
                        f"(data root: {cfg.resolved_root()}; set data.root or LEAF_DATA_DIR)")
    fmt = source.format if source.format != "auto" else _detect_format(path)
    if fmt == "beir":
        return read_beir(path, source.beir_parts)
    if fmt == "parquet":
        return read_parquet(path, source)
    return read_jsonl(path, source.id_field, source.text_field, source.kind_field, source.kind)


def _sample(rows: list, n: int | None, rng: np.random.Generator) -> list:
    if n is None or n >= len(rows):
        return rows
    keep = np.sort(rng.choice(len(rows), size=n, replace=False))
    return [rows[i] for i in keep]


def build_mix(cfg: DataConfig) -> tuple[pa.Table, MixReport]:
    """Read every source, apply per-source limits with seeded sampling, drop empty texts, dedupe, and
    return the mix sorted by (kind, text length) plus a report of every row dropped."""
    if not cfg.sources:
        raise DataError("data.sources is empty: name at least one text source")
    report = MixReport()
    rows: list[tuple[str, str, str]] = []
    for source in cfg.sources:
        src_rows = read_source(source, cfg)
        report.read[source.label] = report.read.get(source.label, 0) + len(src_rows)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(source.label.encode())])
        src_rows = _sample(src_rows, source.limit, rng)
        if source.limit_queries is not None or source.limit_documents is not None:
            by_kind = {k: [r for r in src_rows if r[2] == k] for k in KINDS}
            src_rows = (_sample(by_kind["query"], source.limit_queries, rng)
                        + _sample(by_kind["document"], source.limit_documents, rng))
        rows.extend(src_rows)

    kept, seen_text, seen_id = [], set(), {}
    for row in rows:
        row_id, text, kind = row
        if not text.strip():
            if cfg.empty_texts == "error":
                raise DataError(f"row id {row_id!r}: empty or whitespace-only text (data.empty_texts: error)")
            report.dropped_empty += 1
            continue
        if row_id in seen_id:
            if cfg.duplicate_ids == "error":
                raise DataError(f"duplicate id {row_id!r} in the data mix (set data.duplicate_ids: dedupe to keep "
                                "the first occurrence)")
            report.dropped_duplicate_id += 1
            continue
        # The id is taken even when the row is then dropped as a repeated text: otherwise a duplicate id
        # slips through or not depending on row order.
        seen_id[row_id] = True
        if cfg.dedupe_texts and (kind, text) in seen_text:
            report.dropped_duplicate_text += 1
            continue
        seen_text.add((kind, text))
        kept.append(row)
    if not kept:
        raise DataError("the data mix is empty after dropping empty texts and duplicates")
    kept.sort(key=lambda r: (r[2], len(r[1]), r[0]))
    report.kept = dict(Counter(r[2] for r in kept))
    return rows_to_table(kept), report


def split_validation(table: pa.Table, size: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Hold out `size` rows (seeded, both kinds in proportion) for training validation."""
    if size <= 0:
        return table, table.slice(0, 0)
    size = min(size, max(len(table) // 10, 1))
    rng = np.random.default_rng(seed)
    held = np.zeros(len(table), dtype=bool)
    held[rng.choice(len(table), size=size, replace=False)] = True
    return table.filter(pa.array(~held)), table.filter(pa.array(held))


def fingerprint_table(table: pa.Table) -> str:
    """Content hash of (id, text, kind) in row order: the data half of a cache's address."""
    digest = hashlib.sha256()
    for batch in table.select(["id", "text", "kind"]).to_batches(max_chunksize=8192):
        for row_id, text, kind in zip(*(c.to_pylist() for c in batch.columns)):
            digest.update(f"{len(row_id)}:{row_id}{len(text)}:{text}{kind}".encode())
    return digest.hexdigest()[:16]


def to_dataset(table: pa.Table, rows_per_block: int | None = None):
    """The mix as a Ray Dataset (one block per `rows_per_block` rows, so work spreads over actors)."""
    import ray

    if rows_per_block is None or len(table) <= rows_per_block:
        return ray.data.from_arrow(table)
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, len(table), rows_per_block)])
