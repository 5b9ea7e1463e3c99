"""Text mix: jsonl / jsonl.gz / parquet / BEIR sources -> a seeded, deduplicated Ray Dataset of {id, text, kind}
rows (order unspecified: tables here are sorted by id before they are compared)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.config import DataConfig, DataSource
from leaf_ray.data import SCHEMA, DataError, build_mix
from leaf_ray.inputs import collect, split_by_id, split_table, validation_fraction
from leaf_ray.teacher.chunks import plan_table

from .conftest import random_texts

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _ray(ray_local):
    """build_mix runs on Ray Data; Ray is the caller's to start."""
    return ray_local


def as_table(ds) -> pa.Table:
    """A (small) mix Dataset as one table sorted by id: its row order is not part of the contract."""
    import ray

    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return table.sort_by([("id", "ascending")])


def rows_for(n_queries: int, n_documents: int, seed: int = 0) -> list[dict]:
    """Distinct texts: a row number keeps random_texts' short sentences from repeating."""
    queries = [{"id": f"q{i}", "text": f"{t} q{i}?", "kind": "query"}
               for i, t in enumerate(random_texts(n_queries, seed=seed, max_words=8))]
    docs = [{"id": f"d{i}", "text": f"{t} d{i}.", "kind": "document"}
            for i, t in enumerate(random_texts(n_documents, seed=seed + 1, min_words=10, max_words=40))]
    return queries + docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_parquet(path: Path, rows: list[dict], columns: tuple[str, ...] = ("id", "text", "kind")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), path)
    return path


def write_beir(folder: Path, corpus: list[dict], queries: list[dict]) -> Path:
    folder.mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    return folder


def mix(root: Path, *sources: DataSource | dict, chunk_bytes: int | None = None, block_rows: int | None = None,
        **data) -> tuple[pa.Table, object]:
    srcs = [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
    sizes = {k: v for k, v in (("chunk_bytes", chunk_bytes), ("block_rows", block_rows)) if v is not None}
    ds, report = build_mix(DataConfig(root=str(root), sources=srcs, **data), **sizes)
    return as_table(ds), report


def data_error(root: Path, *sources, **data) -> str:
    with pytest.raises(DataError) as info:
        mix(root, *sources, **data)
    return str(info.value)


# ---------------------------------------------------------------- formats

def test_jsonl_gz_and_parquet_read_the_same_rows(tmp_path):
    rows = rows_for(30, 20)
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a.jsonl.gz", rows)
    write_parquet(tmp_path / "a.parquet", rows)
    tables = [mix(tmp_path, {"path": name})[0] for name in ("a.jsonl", "a.jsonl.gz", "a.parquet")]
    assert tables[0].schema.names == ["id", "text", "kind"]
    assert len(tables[0]) == 50
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])
    assert sorted(tables[0].column("id").to_pylist()) == sorted(r["id"] for r in rows)


def test_absolute_path_ignores_the_root(tmp_path):
    path = write_jsonl(tmp_path / "elsewhere" / "x.jsonl", rows_for(3, 2))
    table, _ = mix(tmp_path / "some-root", {"path": str(path)})
    assert len(table) == 5


def test_source_kind_assigns_a_kind_to_rows_without_one(tmp_path):
    rows = [{"id": f"p{i}", "text": t} for i, t in enumerate(["alpha passage", "beta passage"])]
    write_parquet(tmp_path / "corpus.parquet", rows, columns=("id", "text"))
    write_jsonl(tmp_path / "corpus.jsonl", [{**r, "id": "j" + r["id"]} for r in rows])
    table, _ = mix(tmp_path, {"path": "corpus.parquet", "kind": "document"},
                   {"path": "corpus.jsonl", "kind": "document"}, dedupe_texts=False)
    assert table.column("kind").to_pylist() == ["document"] * 4


def test_custom_field_names(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"qid": "1", "question": "what is a cell", "type": "query"}])
    table, _ = mix(tmp_path, {"path": "x.jsonl", "id_field": "qid", "text_field": "question", "kind_field": "type"})
    assert table.to_pylist() == [{"id": "1", "text": "what is a cell", "kind": "query"}]
    table, _ = mix(tmp_path, {"path": "x.jsonl", "id_field": "qid", "text_field": "question", "kind_field": "type",
                              "id_prefix": "cells:"})
    assert table.column("id").to_pylist() == ["cells:1"]  # ids of two datasets that both count from 1 stay apart


def test_beir_folder(tmp_path):
    write_beir(tmp_path / "mini",
               corpus=[{"_id": "1", "title": "Cells", "text": "Cells divide."},
                       {"_id": "2", "title": "", "text": "No title here."},
                       {"_id": "3", "text": "Title key absent."}],
               queries=[{"_id": "1", "text": "do cells divide"}, {"_id": "9", "text": "what has no title"}])
    table, report = mix(tmp_path, {"path": "mini"})
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {"doc:1", "doc:2", "doc:3", "query:1", "query:9"}  # same BEIR id, two rows
    assert rows["doc:1"] == {"id": "doc:1", "text": "Cells Cells divide.", "kind": "document"}
    assert rows["doc:2"]["text"] == "No title here." and rows["doc:3"]["text"] == "Title key absent."
    assert rows["query:1"] == {"id": "query:1", "text": "do cells divide", "kind": "query"}
    assert report.read == {"mini": 5}
    only_corpus, _ = mix(tmp_path, {"path": "mini", "beir_parts": ["corpus"]})
    assert set(only_corpus.column("kind").to_pylist()) == {"document"} and len(only_corpus) == 3


def test_beir_corpus_missing_field_names_file_line_and_field(tmp_path):
    write_beir(tmp_path / "bad", corpus=[{"_id": "1", "text": "ok"}, {"_id": "2", "title": "no text"}],
               queries=[{"_id": "1", "text": "q"}])
    message = data_error(tmp_path, {"path": "bad"})
    assert f"{tmp_path / 'bad' / 'corpus.jsonl'}:2" in message and "'text'" in message


# ---------------------------------------------------------------- sampling and limits

def test_seeded_sampling(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", rows_for(100, 100))
    ids = lambda seed: sorted(mix(tmp_path, {"path": "x.jsonl", "limit": 40}, seed=seed)[0].column("id").to_pylist())  # noqa: E731
    first = ids(0)
    assert len(first) == 40
    assert ids(0) == first
    assert ids(1) != first and len(ids(1)) == 40


def test_limit_queries_and_limit_documents(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", rows_for(50, 30))
    table, report = mix(tmp_path, {"path": "x.jsonl", "limit_queries": 7, "limit_documents": 3})
    assert report.kept == {"query": 7, "document": 3} and len(table) == 10
    assert report.read == {"x.jsonl": 80}
    only_docs, _ = mix(tmp_path, {"path": "x.jsonl", "limit_queries": 0})
    assert set(only_docs.column("kind").to_pylist()) == {"document"} and len(only_docs) == 30
    more_than_there_are, _ = mix(tmp_path, {"path": "x.jsonl", "limit_queries": 500, "limit_documents": 500})
    assert len(more_than_there_are) == 80


def test_limit_applies_before_per_kind_limits(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", rows_for(50, 50))
    table, report = mix(tmp_path, {"path": "x.jsonl", "limit": 20, "limit_queries": 5})
    assert report.kept["query"] == 5
    assert 5 < len(table) <= 20  # 20 sampled rows, of which at most 5 queries are kept


def test_two_sources_are_sampled_independently(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows_for(20, 0))
    write_jsonl(tmp_path / "b.jsonl", [{**r, "id": "b" + r["id"], "text": "b " + r["text"]} for r in rows_for(0, 20)])
    table, report = mix(tmp_path, {"path": "a.jsonl", "limit": 5}, {"path": "b.jsonl", "limit": 6, "name": "bee"})
    assert report.read == {"a.jsonl": 20, "bee": 20}
    assert report.kept == {"query": 5, "document": 6}


def test_sources_with_the_same_label_add_up_in_the_report(tmp_path):
    write_jsonl(tmp_path / "a" / "texts.jsonl", rows_for(4, 0))
    write_jsonl(tmp_path / "b" / "texts.jsonl", [{**r, "id": "b" + r["id"]} for r in rows_for(0, 3)])
    _, report = mix(tmp_path, {"path": "a/texts.jsonl"}, {"path": "b/texts.jsonl"})
    assert report.read == {"texts.jsonl": 7} and sum(report.kept.values()) == 7


# ---------------------------------------------------------------- cleaning

def test_repeated_texts_are_deduped_and_counted(tmp_path):
    rows = [{"id": "1", "text": "same words", "kind": "query"},
            {"id": "2", "text": "same words", "kind": "query"},
            {"id": "3", "text": "same words", "kind": "document"},  # other kind: a different row
            {"id": "4", "text": "other words", "kind": "query"},
            {"id": "5", "text": "same words", "kind": "query"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    table, report = mix(tmp_path, {"path": "x.jsonl"})
    assert sorted(table.column("id").to_pylist()) == ["1", "3", "4"]
    assert report.dropped_duplicate_text == 2
    kept_all, report = mix(tmp_path, {"path": "x.jsonl"}, dedupe_texts=False)
    assert len(kept_all) == 5 and report.dropped_duplicate_text == 0


def test_duplicate_ids_are_an_error_naming_the_id(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows_for(5, 5))
    write_jsonl(tmp_path / "b.jsonl", [{"id": "q3", "text": "a new text entirely", "kind": "query"}])
    message = data_error(tmp_path, {"path": "a.jsonl"}, {"path": "b.jsonl"})
    assert "duplicate id 'q3'" in message and "data.duplicate_ids" in message


def test_duplicate_ids_deduped_on_request(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows_for(5, 5))
    write_jsonl(tmp_path / "b.jsonl", [{"id": "q3", "text": "a new text entirely", "kind": "query"},
                                       {"id": "d1", "text": "another new text", "kind": "document"}])
    table, report = mix(tmp_path, {"path": "a.jsonl"}, {"path": "b.jsonl"}, duplicate_ids="dedupe")
    assert report.dropped_duplicate_id == 2 and len(table) == 10
    assert "a new text entirely" not in table.column("text").to_pylist()  # the first occurrence wins


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)])
def test_duplicate_id_caught_whatever_the_row_order(tmp_path, order):
    """A row dropped as a repeated text still holds its id: a later row with that id is a duplicate."""
    rows = [{"id": "a", "text": "shared text", "kind": "query"},
            {"id": "b", "text": "shared text", "kind": "query"},
            {"id": "b", "text": "a text of its own", "kind": "query"}]
    write_jsonl(tmp_path / "x.jsonl", [rows[i] for i in order])
    assert "duplicate id 'b'" in data_error(tmp_path, {"path": "x.jsonl"})


def test_empty_and_whitespace_texts_dropped_and_counted(tmp_path):
    rows = rows_for(3, 3) + [{"id": "e1", "text": "", "kind": "query"},
                             {"id": "e2", "text": "   \n\t ", "kind": "document"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    table, report = mix(tmp_path, {"path": "x.jsonl"})
    assert len(table) == 6 and report.dropped_empty == 2
    assert not {"e1", "e2"} & set(table.column("id").to_pylist())
    assert report.as_dict()["dropped_empty"] == 2
    message = data_error(tmp_path, {"path": "x.jsonl"}, empty_texts="error")
    assert "'e1'" in message and "empty" in message


def test_everything_dropped_is_an_error(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"id": "e1", "text": " ", "kind": "query"}])
    assert "empty" in data_error(tmp_path, {"path": "x.jsonl"})


def test_no_sources_is_an_error(tmp_path):
    with pytest.raises(DataError, match="data.sources is empty"):
        build_mix(DataConfig(root=str(tmp_path), sources=[]))


def test_the_mix_is_a_materialized_dataset_of_the_text_schema(tmp_path):
    from ray.data.dataset import MaterializedDataset

    write_jsonl(tmp_path / "x.jsonl", rows_for(40, 40))
    ds, report = build_mix(DataConfig(root=str(tmp_path), sources=[DataSource(path="x.jsonl")]))
    assert isinstance(ds, MaterializedDataset)
    assert pa.schema(list(zip(ds.schema().names, ds.schema().types))) == SCHEMA
    assert ds.count() == 80 and report.kept == {"query": 40, "document": 40}


# ---------------------------------------------------------------- bad input names file, line and field

def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    good = json.dumps({"id": "1", "text": "fine", "kind": "query"}).encode()
    path.write_bytes(good + b"\n" + good.replace(b"fine", b"caf\xe9 latte") + b"\n")
    message = data_error(tmp_path, {"path": "x.jsonl"})
    assert f"{path}:2:" in message and "UTF-8" in message


def test_non_utf8_in_gzip_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    lines = [json.dumps({"id": str(i), "text": f"text {i}", "kind": "query"}).encode() for i in range(5)]
    lines[3] = lines[3].replace(b"text", b"\xff\xfe")
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    assert f"{path}:4:" in data_error(tmp_path, {"path": "x.jsonl.gz"})


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "1", "text": "ok", "kind": "query"}\n\n{"id": "2", "text": "cut\n')
    message = data_error(tmp_path, {"path": "x.jsonl"})
    assert f"{path}:3:" in message and "malformed JSON" in message


def test_non_object_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('["id", "text"]\n')
    assert f"{path}:1: expected a JSON object" in data_error(tmp_path, {"path": "x.jsonl"})


@pytest.mark.parametrize("field", ["id", "text"])
def test_missing_field_names_file_line_and_field(tmp_path, field):
    path = tmp_path / "x.jsonl"
    rows = rows_for(2, 0)
    del rows[1][field]
    write_jsonl(path, rows)
    assert f"{path}:2: missing field '{field}'" in data_error(tmp_path, {"path": "x.jsonl"})


def test_bad_kind_names_the_field(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": "1", "text": "t", "kind": "passage"}])
    message = data_error(tmp_path, {"path": "x.jsonl"})
    assert f"{path}:1: field 'kind'" in message and "'passage'" in message


def test_non_string_text_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"id": "1", "text": 42, "kind": "query"}])
    assert f"{path}:1: field 'text' must be a string" in data_error(tmp_path, {"path": "x.jsonl"})


def test_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "1", "text": "t", "kind": "query"}).encode() + b"\n")
    assert len(mix(tmp_path, {"path": "x.jsonl"})[0]) == 1


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    write_jsonl(path, rows_for(200, 200))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = data_error(tmp_path, {"path": "x.jsonl.gz"})
    assert str(path) in message


@pytest.mark.parametrize("missing", ["id", "text", "kind"])
def test_parquet_missing_column_names_it(tmp_path, missing):
    path = write_parquet(tmp_path / "x.parquet", rows_for(3, 3),
                         columns=tuple(c for c in ("id", "text", "kind") if c != missing))
    message = data_error(tmp_path, {"path": "x.parquet"})
    assert str(path) in message and f"missing column '{missing}'" in message


def test_parquet_null_text_names_the_row(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "text": ["ok", None], "kind": ["query", "query"]}), path)
    assert f"{path} row 1: missing field 'text'" in data_error(tmp_path, {"path": "x.parquet"})


def test_missing_path_names_the_path_and_the_data_root(tmp_path):
    message = data_error(tmp_path, {"path": "nowhere/texts.jsonl", "name": "mine"})
    assert str(tmp_path / "nowhere" / "texts.jsonl") in message
    assert f"data root: {tmp_path}" in message and "'mine'" in message


def test_a_glob_pattern_reads_its_files_in_name_order(tmp_path):
    rows = rows_for(20, 10)
    write_parquet(tmp_path / "shards" / "train-00001.parquet", rows[15:])
    again = [{**r, "text": r["text"] + " again"} for r in rows[15:17]]  # 2 ids of the later file, first here
    write_parquet(tmp_path / "shards" / "train-00000.parquet", rows[:15] + again)
    table, report = mix(tmp_path, {"path": "shards/train-*.parquet", "name": "shards"}, duplicate_ids="dedupe")
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    kept = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    assert [kept[r["id"]] for r in again] == [r["text"] for r in again]  # the first file in name order wins
    assert report.read == {"shards": 32} and report.dropped_duplicate_id == 2
    assert "matches no file" in data_error(tmp_path, {"path": "shards/test-*.parquet"})


def test_id_less_parquet_rows_are_named_by_source_file_and_row(tmp_path):
    texts = [{"text": f"passage number {i}"} for i in range(6)]
    for part in ("a", "b"):  # the same file name under two folders of one pattern
        write_parquet(tmp_path / f"pqa_{part}" / "train.parquet", texts[:3] if part == "a" else texts[3:],
                      columns=("text",))
    table, _ = mix(tmp_path, {"path": "pqa_*/train.parquet", "name": "pqa", "id_field": None, "kind": "document"})
    assert sorted(table.column("id").to_pylist()) == [f"pqa:pqa_{p}/train.parquet:{i}" for p in "ab" for i in range(3)]
    write_parquet(tmp_path / "one.parquet", texts, columns=("text",))
    table, _ = mix(tmp_path, {"path": "one.parquet", "id_field": None, "kind": "document"})
    assert sorted(table.column("id").to_pylist()) == [f"one.parquet:{i}" for i in range(6)]
    with pytest.raises(ValueError, match="id_field: null .* needs a parquet source"):
        DataSource(path="x.jsonl", id_field=None)


def test_unknown_format_and_plain_directory(tmp_path):
    (tmp_path / "x.csv").write_text("id,text\n")
    assert "set the source's `format`" in data_error(tmp_path, {"path": "x.csv"})
    (tmp_path / "folder").mkdir()
    assert "BEIR folder" in data_error(tmp_path, {"path": "folder"})


# ---------------------------------------------------------------- fingerprint and validation split

def test_fingerprint_changes_with_one_text(tmp_path):
    """The data half of a cache's address: the same for the same rows in any order, changed by any id, text or
    kind (leaf_ray.teacher.chunks)."""
    write_jsonl(tmp_path / "x.jsonl", rows_for(20, 20))
    table, _ = mix(tmp_path, {"path": "x.jsonl"})
    fp = plan_table(table, 3).fingerprint
    assert fp == plan_table(mix(tmp_path, {"path": "x.jsonl"})[0].take(list(range(39, -1, -1))), 3).fingerprint
    texts = table.column("text").to_pylist()
    texts[7] = texts[7] + "!"
    assert plan_table(table.set_column(1, "text", pa.array(texts)), 3).fingerprint != fp
    assert plan_table(table.slice(1), 3).fingerprint != fp
    kinds = table.column("kind").to_pylist()
    kinds[0] = "query" if kinds[0] == "document" else "document"
    assert plan_table(table.set_column(2, "kind", pa.array(kinds)), 3).fingerprint != fp


@pytest.mark.timeout(120)
@pytest.mark.e2e
def test_validation_split_is_by_id_hash_seeded_and_disjoint(ray_local, tmp_path):
    """Held-out rows are chosen by a seeded hash of the id: the same from a table and from a Dataset in any blocks,
    about `size` of them, at most a tenth of the mix."""
    import ray

    write_jsonl(tmp_path / "x.jsonl", rows_for(3000, 2000))
    table, _ = mix(tmp_path, {"path": "x.jsonl"})
    train, val = split_table(table, 400, seed=0)
    train_ids, val_ids = set(train.column("id").to_pylist()), set(val.column("id").to_pylist())
    assert 300 < len(val) < 500 and len(train) + len(val) == 5000
    assert not train_ids & val_ids and train_ids | val_ids == set(table.column("id").to_pylist())
    assert split_table(table.take(list(range(4999, -1, -1))), 400, seed=0)[1].column("id").to_pylist() == \
        val.take(list(range(len(val) - 1, -1, -1))).column("id").to_pylist()  # a row's fate ignores the others
    assert set(split_table(table, 400, seed=1)[1].column("id").to_pylist()) != val_ids
    assert 400 < len(split_table(table, 100_000, seed=0)[1]) < 600  # capped at a tenth of the mix
    whole, empty = split_table(table, 0, seed=0)
    assert whole.equals(table) and len(empty) == 0
    blocks = ray.data.from_arrow([table.slice(i, 700) for i in range(0, 5000, 700)])
    ds_train, ds_val = split_by_id(blocks, validation_fraction(400, 5000), seed=0)
    assert set(collect(ds_val).column("id").to_pylist()) == val_ids
    assert ds_train.count() == len(train)


# ---------------------------------------------------------------- the real data root

@pytest.mark.slow
def test_real_train_text_mix(data_root):
    ds, report = build_mix(DataConfig(root=str(data_root), sources=[
        DataSource(path="train-text/texts.jsonl.gz", limit_queries=500, limit_documents=100)]))
    table = as_table(ds)
    assert len(table) == 600
    assert report.kept == {"query": 500, "document": 100}
    assert report.read == {"texts.jsonl.gz": 181_613}
    assert report.dropped_empty == report.dropped_duplicate_text == report.dropped_duplicate_id == 0
    assert len(set(table.column("id").to_pylist())) == 600


@pytest.mark.slow
def test_real_scifact_as_beir(data_root):
    ds, report = build_mix(DataConfig(root=str(data_root), dedupe_texts=False,
                                      sources=[DataSource(path="scifact")]))
    table = as_table(ds)
    kinds = table.column("kind").to_pylist()
    assert kinds.count("document") == 5183 and kinds.count("query") == 1109
    ids = table.column("id").to_pylist()
    assert all(i.startswith("doc:") for i, k in zip(ids, kinds) if k == "document")
    assert all(i.startswith("query:") for i, k in zip(ids, kinds) if k == "query")
    # SciFact repeats four query texts under different ids: the default mix keeps one of each.
    deduped, report = build_mix(DataConfig(root=str(data_root), sources=[DataSource(path="scifact")]))
    assert report.read == {"scifact": 6292}
    assert report.kept == {"document": 5183, "query": 1105} and report.dropped_duplicate_text == 4


# ---------------------------------------------------------------- distributed: blocks, files, parallelism

def reference_mix(rows: list[dict], dedupe_texts: bool = True) -> tuple[set[str], dict]:
    """The sequential rule the distributed mix must match (rows in source order, then file order)."""
    kept, seen_text, seen_id = set(), set(), set()
    counts = {"dropped_empty": 0, "dropped_duplicate_id": 0, "dropped_duplicate_text": 0}
    for row in rows:
        if not row["text"].strip():
            counts["dropped_empty"] += 1
        elif row["id"] in seen_id:
            counts["dropped_duplicate_id"] += 1
        else:
            seen_id.add(row["id"])
            if dedupe_texts and (row["kind"], row["text"]) in seen_text:
                counts["dropped_duplicate_text"] += 1
            else:
                seen_text.add((row["kind"], row["text"]))
                kept.add((row["id"], row["text"]))
    return kept, counts


def messy_rows(n: int, seed: int, prefix: str) -> list[dict]:
    """Rows with many repeated ids and texts (and a few empty texts), spread through the file."""
    rng = np.random.default_rng(seed)
    return [{"id": f"i{rng.integers(n // 2)}", "text": [f"t{rng.integers(n // 3)} {prefix}", "  "][int(rng.random() < .05)],
             "kind": ["query", "document"][int(rng.integers(2))]} for _ in range(n)]


def test_duplicates_straddling_blocks_and_files_are_removed_exactly_once(tmp_path):
    a, b = messy_rows(400, 0, "x"), messy_rows(300, 1, "x")  # same id and text space: repeats across files
    write_jsonl(tmp_path / "a.jsonl", a)
    write_jsonl(tmp_path / "b.jsonl.gz", b)
    expected, counts = reference_mix(a + b)
    results = []
    for chunk_bytes, block_rows in ((1 << 20, 50_000), (3001, 29), (997, 61)):
        table, report = mix(tmp_path, {"path": "a.jsonl"}, {"path": "b.jsonl.gz"}, duplicate_ids="dedupe",
                            chunk_bytes=chunk_bytes, block_rows=block_rows)
        assert {(r["id"], r["text"]) for r in table.to_pylist()} == expected
        assert len(table) == len(expected)  # each kept once
        assert {k: getattr(report, k) for k in counts} == counts
        results.append(table)
    assert all(t.equals(results[0]) for t in results)
    assert "duplicate id" in data_error(tmp_path, {"path": "a.jsonl"}, {"path": "b.jsonl.gz"}, chunk_bytes=997)


def test_the_first_duplicate_id_named_is_the_earliest_whatever_the_chunks(tmp_path):
    rows = rows_for(60, 0) + [{"id": "q50", "text": "late repeat", "kind": "query"},
                              {"id": "q7", "text": "later repeat", "kind": "query"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    for chunk_bytes in (1 << 20, 64):
        assert "duplicate id 'q50'" in data_error(tmp_path, {"path": "x.jsonl"}, chunk_bytes=chunk_bytes)


def test_an_empty_text_takes_no_id_and_a_repeated_text_does(tmp_path):
    rows = [{"id": "a", "text": "  ", "kind": "query"}, {"id": "a", "text": "real words", "kind": "query"},
            {"id": "b", "text": "real words", "kind": "query"}, {"id": "c", "text": "more", "kind": "query"},
            {"id": "b", "text": "new words", "kind": "query"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    table, report = mix(tmp_path, {"path": "x.jsonl"}, duplicate_ids="dedupe")
    assert table.column("id").to_pylist() == ["a", "c"]
    assert (report.dropped_empty, report.dropped_duplicate_text, report.dropped_duplicate_id) == (1, 1, 1)
    # With errors on: the earliest problem in row order is the one reported.
    assert "'a'" in data_error(tmp_path, {"path": "x.jsonl"}, empty_texts="error")
    assert "duplicate id 'b'" in data_error(tmp_path, {"path": "x.jsonl"})


def test_limits_give_the_same_rows_whatever_the_blocks_files_and_format(tmp_path):
    rows = rows_for(300, 200)
    write_jsonl(tmp_path / "x.jsonl", rows)
    write_jsonl(tmp_path / "x.jsonl.gz", rows)
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in ("id", "text", "kind")}), path, row_group_size=37)
    source = {"limit": 260, "limit_queries": 90, "limit_documents": 55, "name": "same-label"}
    ids = []
    for name, chunk_bytes, block_rows in (("x.jsonl", 1 << 20, 50_000), ("x.jsonl", 9000, 7), ("x.jsonl", 2500, 40),
                                          ("x.jsonl.gz", 1 << 20, 11), ("x.parquet", 1 << 20, 50)):
        table, report = mix(tmp_path, {"path": name, **source}, chunk_bytes=chunk_bytes, block_rows=block_rows)
        assert report.kept == {"query": 90, "document": 55}
        ids.append(table.column("id").to_pylist())
    assert all(i == ids[0] for i in ids)
    other_seed = mix(tmp_path, {"path": "x.jsonl", **source}, seed=5)[0].column("id").to_pylist()
    assert other_seed != ids[0]


def test_limits_are_exact_when_the_boundary_is_narrowed_over_several_passes(tmp_path, monkeypatch):
    from leaf_ray.data import mix as mix_module
    from leaf_ray.data.sources import sample_hash_key, sample_keys

    rows = rows_for(700, 0)
    write_jsonl(tmp_path / "x.jsonl", rows)
    wide = mix(tmp_path, {"path": "x.jsonl", "limit": 123})[0].column("id").to_pylist()
    monkeypatch.setattr(mix_module, "FETCH_KEYS", 2)  # force histogram passes down to a bucket of two keys
    narrow = mix(tmp_path, {"path": "x.jsonl", "limit": 123}, chunk_bytes=900)[0].column("id").to_pylist()
    keys = sample_keys(np.array([r["id"] for r in rows], dtype=object), sample_hash_key(0, "x.jsonl"))
    smallest = sorted(rows[i]["id"] for i in np.argsort(keys, kind="stable")[:123])
    assert wide == narrow == smallest


# ---------------------------------------------------------------- readers: errors at the right line, fuzzed

def test_an_error_in_a_later_byte_range_names_its_absolute_line(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = [json.dumps(r) for r in rows_for(80, 0)]
    lines[61] = lines[61][:-3]  # line 62: cut short
    lines[70] = '{"id": "x"}'  # line 71: a later error, in another range
    path.write_text("\n".join(lines) + "\n")
    for chunk_bytes in (1 << 20, 1000, 150):
        message = data_error(tmp_path, {"path": "x.jsonl"}, chunk_bytes=chunk_bytes)
        assert message.startswith(f"{path}:62: malformed JSON")


def test_python_whitespace_is_what_counts_as_empty():
    from leaf_ray.data.sources import PY_WHITESPACE, blank

    assert set(PY_WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}
    texts = ["", " ", "\x1c\u3000\n", "a", " \u200b ", "\x00", "x "]
    assert blank(pa.array(texts)).to_pylist() == [not t.strip() for t in texts]


def _lines_strategy():
    from hypothesis import strategies as st

    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
    good_id = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=8), st.integers(-10**12, 10**12))
    good = st.fixed_dictionaries({"id": good_id, "text": text, "kind": st.sampled_from(["query", "document"])})

    def ok(obj):
        return ("row", json.dumps(obj, ensure_ascii=bool(len(obj["text"]) % 2)).encode())

    bad_value = st.one_of(st.none(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                          st.dictionaries(st.text(max_size=2), st.integers(), max_size=1), st.booleans())
    return st.one_of(
        good.map(ok),
        good.map(lambda o: ("row", json.dumps({**o, "text": "\ud83d\ude00 pair " + o["text"]}).encode())),
        st.integers(1000, 300_000).map(lambda n: ("row", json.dumps({"id": "huge", "text": "w" * n,
                                                                    "kind": "query"}).encode())),
        st.sampled_from([b"", b"   ", b"\t\r", "\u3000".encode()]).map(lambda b: ("blank", b)),
        good.map(lambda o: ("bad", json.dumps(o).encode()[:-1])),  # cut short
        good.map(lambda o: ("bad", json.dumps({**o, "text": "\ud800" + o["text"]}).encode())),  # lone surrogate
        good.map(lambda o: ("bad", json.dumps({**o, "id": "\udfff"}).encode())),
        st.binary(max_size=40).map(lambda b: ("bad", b"\xff" + b.replace(b"\n", b""))),  # not UTF-8
        st.sampled_from([b"[1, 2]", b"42", b'"text"', b"null", b"{", b"{}}"]).map(lambda b: ("bad", b)),
        st.tuples(good, st.sampled_from(["id", "text"])).map(
            lambda t: ("bad", json.dumps({k: v for k, v in t[0].items() if k != t[1]}).encode())),  # missing field
        st.tuples(good, bad_value).map(
            lambda t: ("bad", json.dumps({**t[0], "text": t[1]}).encode())),  # text of the wrong type
        st.tuples(good, bad_value.filter(lambda v: v is not None)).map(
            lambda t: ("bad", json.dumps({**t[0], "id": t[1]}).encode())),  # id of the wrong type
        st.tuples(good, st.text(max_size=5)).map(
            lambda t: ("bad" if t[1] not in ("query", "document") else "row",
                       json.dumps({**t[0], "kind": t[1]}).encode())),
    )


def _expected(lines: list[tuple[str, bytes]], path: str):
    """(rows, None) when every line reads, else (None, the first bad line's 1-based number)."""
    rows = []
    for number, (what, raw) in enumerate(lines, start=1):
        if what == "bad":
            return None, number
        if what == "row":
            obj = json.loads(raw)
            rows.append((str(obj["id"]), obj["text"], obj["kind"]))
    return rows, None


@pytest.mark.timeout(600)
def test_fuzzed_json_lines_are_read_or_refused_naming_file_and_line():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from leaf_ray.data import Fields, parse_json_lines

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_lines_strategy(), min_size=1, max_size=12), st.booleans(), st.booleans())
    def check(lines, bom, crlf):
        path = "/data/fuzz.jsonl"
        data = b"\n".join(raw + (b"\r" if crlf and raw else b"") for _, raw in lines) + b"\n"
        data = (b"\xef\xbb\xbf" if bom else b"") + data
        rows, bad_line = _expected(lines, path)
        try:
            parsed = parse_json_lines(data, Fields(), path)
        except DataError as exc:
            assert bad_line is not None, f"refused a good file: {exc}"
            assert str(exc).startswith(f"{path}:{bad_line}: "), (str(exc), bad_line)
            return
        assert bad_line is None, f"line {bad_line} read without an error"
        assert list(zip(parsed.ids, parsed.texts, parsed.kinds)) == rows  # nothing dropped, nothing changed
        pa.array(parsed.texts, pa.string())  # every text fits an Arrow string column
        pa.array(parsed.ids, pa.string())

    check()


@pytest.mark.timeout(600)
def test_fuzzed_truncated_gzip_is_read_whole_or_refused_naming_the_file(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from leaf_ray.data import read_jsonl

    path = tmp_path / "x.jsonl.gz"
    rows = rows_for(300, 300)
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    expected = [(r["id"], r["text"], r["kind"]) for r in rows]

    @settings(max_examples=60, deadline=None)
    @given(st.integers(0, len(whole)), st.binary(max_size=8))
    def check(cut, junk):
        path.write_bytes(whole[:cut] + (junk if cut < len(whole) else b""))
        try:
            got = read_jsonl(path)
        except DataError as exc:
            assert str(exc).startswith(f"{path}"), str(exc)
            return
        assert got == expected  # never a silent partial read

    check()


def test_ray_read_of_fuzzed_files_matches_the_parser(tmp_path):
    """Ray-level check: the read tasks (split into small byte ranges) agree with the pure parser, line
    numbers included."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=4, deadline=None)
    @given(st.lists(_lines_strategy(), min_size=1, max_size=10))
    def check(lines):
        path = tmp_path / "f.jsonl"
        path.write_bytes(b"\n".join(raw for _, raw in lines) + b"\n")
        rows, bad_line = _expected(lines, str(path))
        if bad_line is not None:
            assert data_error(tmp_path, {"path": "f.jsonl"}, chunk_bytes=200, dedupe_texts=False,
                              duplicate_ids="dedupe", empty_texts="drop").startswith(f"{path}:{bad_line}: ")
            return
        kept = [r for r in rows if r[1].strip()]
        if not kept:
            return
        table, report = mix(tmp_path, {"path": "f.jsonl"}, chunk_bytes=200, dedupe_texts=False,
                            duplicate_ids="dedupe")
        assert report.read == {"f.jsonl": len(rows)}
        assert len(table) == len({r[0] for r in kept})

    check()


def test_s3_uri_source(tmp_path, monkeypatch):
    """Sources may be s3:// URIs read through pyarrow's filesystem (a local moto server here)."""
    moto = pytest.importorskip("moto.server")
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", f"http://{host}:{port}")):
            monkeypatch.setenv(name, value)
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("texts")
        rows = rows_for(20, 10)
        with fs.open_output_stream("texts/x.jsonl") as out:
            out.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        table, report = mix(tmp_path, {"path": "s3://texts/x.jsonl", "limit_queries": 5}, chunk_bytes=300)
    finally:
        server.stop()
    assert report.read == {"x.jsonl": 30} and report.kept == {"query": 5, "document": 10}
