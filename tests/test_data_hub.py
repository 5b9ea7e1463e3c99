"""Where data comes from: the data root, else the Hugging Face cache, else the Hub (offline here).

The Hugging Face cache is built in its real layout (`datasets--<org>--<name>/snapshots/<commit>/...`, `refs/`), so
huggingface_hub itself finds the files, exactly as it would after a download on a machine with the Hub.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from leaf_ray.config import DataConfig, DataSource, EvalConfig, RunConfig
from leaf_ray.data import DataError
from leaf_ray.data.hub import HubPath
from leaf_ray.evaluate import run_evaluation
from tests.conftest import HUB_COMMIT as COMMIT, hub_snapshot
from tests.test_evaluate import bag_of_words, topic_beir, write_sts

pytestmark = pytest.mark.timeout(300)
STS_ROWS = [(5.0, "a cat sits", "a cat sits"), (3.0, "a cat sits", "a cat runs"),
            (1.0, "a dog barks loudly", "the cat sits quietly"), (0.0, "red apple", "fast engine")]


def write_hub_sts(folder: Path, rows, split: str = "test") -> Path:
    """STS pairs as mteb/stsbenchmark-sts ships them: `<split>.jsonl.gz` rows with sentence1, sentence2, score."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"split": split, "score": s, "sentence1": a, "sentence2": b}) + "\n" for s, a, b in rows)
    (folder / f"{split}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    return folder


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_paths_parse_as_hf_file_system_spells_them():
    assert HubPath.parse("hf://datasets/mteb/scifact@abc/qrels/test.tsv") == HubPath("mteb/scifact", "abc",
                                                                                      "qrels/test.tsv")
    assert HubPath.parse("hf://datasets/org/name") == HubPath("org/name", None, "")
    assert str(HubPath.mirrored("org/name@v1", "a/b.parquet")) == "hf://datasets/org/name@v1/a/b.parquet"
    for bad in ("hf://datasets/only-org", "hf://models/org/name/x", "hf://datasets//name/x"):
        with pytest.raises(DataError, match="hf://datasets/<org>/<name>"):
            HubPath.parse(bad)


def test_data_root_first_then_the_hugging_face_cache_then_a_refusal_naming_what_was_tried(tmp_path, hf_cache):
    root = tmp_path / "root"
    cfg = DataConfig(root=str(root), hub={"scifact": f"mteb/scifact@{COMMIT}", "sts": "mteb/sts"})
    with pytest.raises(DataError) as missing:
        cfg.resolve_path("scifact")
    message = str(missing.value)
    assert f"hf://datasets/mteb/scifact@{COMMIT}" in message and str(root / "scifact") in message
    assert "local Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message and "\n" not in message

    snapshot = hub_snapshot(hf_cache, "mteb/scifact", COMMIT)
    topic_beir(snapshot)
    assert cfg.resolve_path("scifact") == snapshot  # a mirrored folder is the repository's root
    assert cfg.resolve_path("scifact/qrels/test.tsv") == snapshot / "qrels" / "test.tsv"
    with pytest.raises(DataError, match=f"snapshot {COMMIT[:12]} has no nothing.tsv"):
        cfg.resolve_path("scifact/nothing.tsv")

    topic_beir(root / "scifact", n_docs=5, n_queries=2)
    assert cfg.resolve_path("scifact") == root / "scifact"  # the data root wins when it holds the entry

    hub_snapshot(hf_cache, "mteb/sts")  # no revision: the cache's `main` ref
    write_hub_sts(hf_cache / "datasets--mteb--sts" / "snapshots" / COMMIT, STS_ROWS)
    assert cfg.resolve_path("sts/test.jsonl.gz").is_file()
    assert cfg.resolve_path("hf://datasets/mteb/sts@main/test.jsonl.gz") == cfg.resolve_path("sts/test.jsonl.gz")


def test_an_entry_without_a_hub_dataset_says_how_to_provide_it(tmp_path, hf_cache, monkeypatch):
    cfg = DataConfig(root=str(tmp_path), hub={})
    with pytest.raises(DataError, match=r"train-text/texts.jsonl.gz does not exist \(data root: .*name the Hugging "
                                        r"Face dataset 'train-text' mirrors in data.hub"):
        cfg.resolve_path("train-text/texts.jsonl.gz")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(DataError, match="allow_hub is false"):
        RunConfig(data={"root": str(tmp_path), "hub": {"x": "org/x"}}).data.resolve_path("x")
    allowed = RunConfig(allow_hub=True, data={"root": str(tmp_path), "hub": {"x": "org/x"}})
    assert allowed.data._allow_hub  # the run's Hub policy reaches data paths (this machine has no Hub to try)


def test_evaluation_reads_the_hub_layouts_exactly_like_the_data_root(tmp_path, hf_cache):
    """SciFact and STS as the data root mirrors them (BEIR folder, STS release csv) and as their Hub datasets ship
    them (the same BEIR folder, mteb's jsonl.gz): the same records, under the names the config uses."""
    root = tmp_path / "root"
    topic_beir(root / "scifact")
    write_sts(root / "stsbenchmark", STS_ROWS)
    topic_beir(hub_snapshot(hf_cache, "mteb/scifact"))
    write_hub_sts(hub_snapshot(hf_cache, "mteb/stsbenchmark-sts"), STS_ROWS)
    hub = {"scifact": "mteb/scifact", "stsbenchmark": "mteb/stsbenchmark-sts"}
    ev = EvalConfig(datasets=["scifact"], sts="stsbenchmark", dims=[32], quantizations=["float32"])
    sources = {"teacher": bag_of_words, "student": bag_of_words}

    mirrored = run_evaluation(ev, sources, DataConfig(root=str(root), hub=hub), progress=False)
    from_cache = run_evaluation(ev, sources, DataConfig(root=str(tmp_path / "empty"), hub=hub), progress=False)
    assert from_cache.records == mirrored.records
    assert {r["dataset"] for r in from_cache.records} == {"scifact", "stsbenchmark"}
    assert from_cache.datasets == mirrored.datasets


def test_a_source_named_by_its_hub_path_is_read_from_the_cache(tmp_path, hf_cache, ray_local):
    from leaf_ray.data import build_mix

    snapshot = hub_snapshot(hf_cache, "org/texts")
    rows = [{"id": f"t{i}", "text": f"text number {i}", "kind": "query" if i % 2 else "document"} for i in range(40)]
    (snapshot / "data").mkdir()
    (snapshot / "data" / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = DataSource(path="hf://datasets/org/texts/data/texts.jsonl", name="texts", limit_queries=5)
    ds, report = build_mix(DataConfig(root=str(tmp_path / "empty"), sources=[source]))
    assert report.kept == {"query": 5, "document": 20}
    assert ds.count() == 25
    with pytest.raises(DataError, match=r"data source 'gone': hf://datasets/org/gone.*not found"):
        build_mix(DataConfig(root=str(tmp_path), sources=[DataSource(path="hf://datasets/org/gone/x.jsonl",
                                                                     name="gone")]))


@pytest.mark.slow
def test_the_default_config_finds_scifact_in_a_hugging_face_cache_without_a_data_root(tmp_path, data_root):
    """The default config names SciFact by its pinned Hub dataset: with an empty data root and SciFact's files in
    a Hugging Face cache (HF_HUB_CACHE, offline), a fresh process resolves and reads all of it."""
    repo_id, _, revision = RunConfig().data.hub["scifact"].partition("@")
    cache = tmp_path / "hf-cache"
    scifact = hub_snapshot(cache, repo_id, revision, commit=revision)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels"):
        (scifact / name).symlink_to(data_root / "scifact" / name)
    code = ("import json; from leaf_ray.config import load_config; from leaf_ray.evaluate import beir_dataset; "
            "cfg = load_config(); print(json.dumps(beir_dataset(cfg.data, cfg.evaluate.datasets[0], 'test').summary()))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "LEAF_DATA_DIR": str(tmp_path / "empty")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["dataset"], summary["documents"], summary["queries"]) == ("scifact", 5183, 300)
