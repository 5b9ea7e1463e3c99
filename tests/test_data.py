"""Text mix: jsonl / jsonl.gz / parquet / BEIR sources -> seeded, deduplicated, sorted {id, text, kind} rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.config import DataConfig, DataSource
from leaf_ray.data import DataError, build_mix, fingerprint_table, split_validation

from .conftest import random_texts


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


def mix(root: Path, *sources: DataSource | dict, **data) -> tuple[pa.Table, object]:
    srcs = [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
    return build_mix(DataConfig(root=str(root), sources=srcs, **data))


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


def test_rows_sorted_by_kind_then_length(tmp_path):
    rows = rows_for(40, 40)
    write_jsonl(tmp_path / "x.jsonl", rows)
    table, _ = mix(tmp_path, {"path": "x.jsonl"})
    keys = [(r["kind"], len(r["text"])) for r in table.to_pylist()]
    assert keys == sorted(keys)
    assert keys[0][0] == "document" and keys[-1][0] == "query"


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


def test_unknown_format_and_plain_directory(tmp_path):
    (tmp_path / "x.csv").write_text("id,text\n")
    assert "set the source's `format`" in data_error(tmp_path, {"path": "x.csv"})
    (tmp_path / "folder").mkdir()
    assert "BEIR folder" in data_error(tmp_path, {"path": "folder"})


# ---------------------------------------------------------------- fingerprint and validation split

def test_fingerprint_changes_with_one_text(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", rows_for(20, 20))
    table, _ = mix(tmp_path, {"path": "x.jsonl"})
    fp = fingerprint_table(table)
    assert fp == fingerprint_table(mix(tmp_path, {"path": "x.jsonl"})[0])  # stable
    texts = table.column("text").to_pylist()
    texts[7] = texts[7] + "!"
    changed = table.set_column(1, "text", pa.array(texts))
    assert fingerprint_table(changed) != fp
    assert fingerprint_table(table.slice(1)) != fp
    kinds = table.column("kind").to_pylist()
    kinds[0] = "query" if kinds[0] == "document" else "document"
    assert fingerprint_table(table.set_column(2, "kind", pa.array(kinds))) != fp


def test_split_validation_is_seeded_and_disjoint(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", rows_for(300, 200))
    table, _ = mix(tmp_path, {"path": "x.jsonl"})
    train, val = split_validation(table, 40, seed=0)
    train_ids, val_ids = set(train.column("id").to_pylist()), set(val.column("id").to_pylist())
    assert len(val) == 40 and len(train) == 460
    assert not train_ids & val_ids and train_ids | val_ids == set(table.column("id").to_pylist())
    again = split_validation(table, 40, seed=0)[1]
    assert again.equals(val)
    assert set(split_validation(table, 40, seed=1)[1].column("id").to_pylist()) != val_ids
    assert len(split_validation(table, 10_000, seed=0)[1]) == 50  # capped at a tenth of the mix
    whole, empty = split_validation(table, 0, seed=0)
    assert whole.equals(table) and len(empty) == 0


# ---------------------------------------------------------------- the real data root

@pytest.mark.slow
def test_real_train_text_mix(data_root):
    table, report = build_mix(DataConfig(root=str(data_root), sources=[
        DataSource(path="train-text/texts.jsonl.gz", limit_queries=500, limit_documents=100)]))
    assert len(table) == 600
    assert report.kept == {"query": 500, "document": 100}
    assert report.read == {"texts.jsonl.gz": 181_613}
    assert report.dropped_empty == report.dropped_duplicate_text == report.dropped_duplicate_id == 0
    assert len(set(table.column("id").to_pylist())) == 600


@pytest.mark.slow
def test_real_scifact_as_beir(data_root):
    table, report = build_mix(DataConfig(root=str(data_root), dedupe_texts=False,
                                         sources=[DataSource(path="scifact")]))
    kinds = table.column("kind").to_pylist()
    assert kinds.count("document") == 5183 and kinds.count("query") == 1109
    ids = table.column("id").to_pylist()
    assert all(i.startswith("doc:") for i, k in zip(ids, kinds) if k == "document")
    assert all(i.startswith("query:") for i, k in zip(ids, kinds) if k == "query")
    # SciFact repeats four query texts under different ids: the default mix keeps one of each.
    deduped, report = build_mix(DataConfig(root=str(data_root), sources=[DataSource(path="scifact")]))
    assert report.read == {"scifact": 6292}
    assert report.kept == {"document": 5183, "query": 1105} and report.dropped_duplicate_text == 4
