"""The Ray Data teacher stage and its parquet cache, on real local Ray with real (tiny and bundled) models."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest

from leaf_ray.config import DataConfig, DataSource, TeacherConfig
from leaf_ray.data import build_mix
from leaf_ray.inputs import collect
from leaf_ray.models import ModelStore
from leaf_ray.teacher import CacheMismatchError, build_cache, teacher_embeddings
from leaf_ray.teacher.backends import TeacherOutputError, check_vectors
from leaf_ray.teacher.cache import CacheDamagedError, TeacherCache
from leaf_ray.teacher.chunks import plan_dataset, plan_table, with_chunk
from leaf_ray.teacher.stage import CacheWriter, cache_path_for, plan_for
from tests.conftest import REPO, build_tiny_bert, random_texts

pytestmark = pytest.mark.timeout(300)


def text_table(n: int, seed: int = 0) -> pa.Table:
    texts = random_texts(n, seed)
    kinds = ["query" if i % 3 else "document" for i in range(n)]
    return pa.table({"id": [f"t{i}" for i in range(n)], "text": texts, "kind": kinds})


def teacher_cfg(model: Path, **kw) -> TeacherConfig:
    base = dict(model=str(model), query_prompt="gene study ", document_prompt="cell data ",  # in-vocab words
                batch_size=16, chunk_rows=64, max_length=64, torch_threads=1)
    return TeacherConfig(**(base | kw))


def plain_encode(model_dir: Path, table: pa.Table, cfg: TeacherConfig) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = cfg.max_length
    out = np.zeros((len(table), model.get_embedding_dimension()), dtype=np.float32)
    kinds = np.array(table.column("kind").to_pylist())
    texts = table.column("text").to_pylist()
    for kind in ("query", "document"):
        rows = np.flatnonzero(kinds == kind)
        out[rows] = model.encode([texts[i] for i in rows], prompt=cfg.prompt_for(kind), normalize_embeddings=True)
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.e2e
def test_stage_matches_plain_encoding_and_keeps_every_id_once(ray_local, tiny_teacher, tmp_path):
    table = text_table(300)
    cfg = teacher_cfg(tiny_teacher)
    cache = build_cache(table, cfg, tmp_path)
    ids = table.column("id").to_pylist()
    cached = cache.read_table()
    assert sorted(cached.column("id").to_pylist()) == sorted(ids)
    assert cache.manifest["complete"] and cache.dim == 32 and cache.chunks == 8  # 300 / 64 rows, up to a power of two
    run = cache.manifest["last_run"]
    assert run["rows_computed"] == 300
    # timed by the actors' stamps of each chunk: the first chunk is done before the stage ends, the rest after it
    assert 0 < run["first_output_s"] < run["seconds"] and run["steady_rows_per_s"] > 0
    vectors = cache.vectors_for(ids)
    assert cosines(vectors, plain_encode(tiny_teacher, table, cfg)).min() > 0.9999
    # prompts are applied by kind: a query's vector differs from the same text embedded as a document
    swapped = table.set_column(2, "kind", pa.array(["document" if k == "query" else "query"
                                                   for k in table.column("kind").to_pylist()]))
    assert cosines(teacher_embeddings(swapped, cfg, tmp_path), vectors).max() < 0.9999


@pytest.mark.e2e
def test_two_writer_actors_write_every_id_once_from_a_dataset(ray_local, tiny_teacher, tmp_path):
    """A Dataset in many blocks through a pool of 2 actors, each writing the parts of the chunks it embeds."""
    import ray

    table = text_table(700, seed=11)
    cfg = teacher_cfg(tiny_teacher, min_actors=2, max_actors=2, num_cpus_per_actor=0.5)
    cache = build_cache(ray.data.from_arrow([table.slice(i, 90) for i in range(0, 700, 90)]), cfg, tmp_path)
    ids = cache.read_table(["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 700 and set(ids) == set(table.column("id").to_pylist())
    assert cache.chunks == 16 and cache.missing_chunks() == []
    assert cosines(cache.vectors_for(table.column("id").to_pylist()), plain_encode(tiny_teacher, table, cfg)).min() > 0.9999
    assert build_cache(table, cfg, tmp_path).path == cache.path  # the same rows as a table: the same cache


@pytest.mark.e2e
def test_a_grown_mix_copies_the_rows_another_cache_holds_and_embeds_only_the_rest(ray_local, tiny_teacher, tmp_path):
    """A mix that grows under the same teacher settings takes the rows another cache already holds (same id, text
    and kind) instead of embedding them again: the scaling curve's points share one growing set of vectors."""
    cfg = teacher_cfg(tiny_teacher)
    small = build_cache(text_table(200), cfg, tmp_path)
    grown = text_table(600)  # t0..t199 as before, then 400 new rows; one old text and one old kind changed
    texts, kinds = grown.column("text").to_pylist(), grown.column("kind").to_pylist()
    texts[5], kinds[7] = texts[5] + " gene", "query" if kinds[7] == "document" else "document"
    grown = grown.set_column(1, "text", pa.array(texts)).set_column(2, "kind", pa.array(kinds))
    cache = build_cache(grown, cfg, tmp_path)
    assert cache.path != small.path and cache.chunks == 16 and small.chunks == 4
    assert cache.manifest["last_run"]["rows_copied"] == 198
    vectors = cache.vectors_for(grown.column("id").to_pylist())
    assert cosines(vectors, plain_encode(tiny_teacher, grown, cfg)).min() > 0.9999
    # and the other way: a subset of the grown mix is copied whole, no teacher call
    shrunk = build_cache(grown.slice(100, 300), cfg, tmp_path)
    assert shrunk.manifest["last_run"]["rows_copied"] == 300


def test_the_writer_hands_back_each_chunk_as_soon_as_its_part_is_written(tiny_teacher, tmp_path):
    """A block can hold many chunks of a slow teacher: its records stream chunk by chunk, so the driver's progress
    moves and Ray Data never sees a task silent for the whole block (which it would stop as stalled)."""
    table, cfg = text_table(200), teacher_cfg(tiny_teacher)
    path, plan = plan_for(table, cfg, tmp_path)
    cache = TeacherCache.open(path, cfg, plan, cfg.chunk_rows)
    writer = CacheWriter(cfg, cache, ModelStore(tmp_path / "models"), others=[])
    records = writer(with_chunk(table, cache.chunks).sort_by("chunk"))
    first = next(records)
    assert first.column("chunk").to_pylist() == [0] and cache.chunk_ok(0)
    assert cache.missing_chunks() == list(range(1, cache.chunks))  # the rest not embedded yet
    assert [r.column("chunk")[0].as_py() for r in records] == list(range(1, cache.chunks))
    assert cache.missing_chunks() == []


def test_chunks_are_planned_by_id_hash_alike_in_process_and_on_ray(ray_local):
    """A row's chunk depends only on its id, and the plan (sizes, digests, fingerprint) only on the set of rows:
    the same from a table, from a Dataset in other blocks and order, and changed by any row's content."""
    import ray

    table = text_table(500, seed=7)
    plan = plan_table(table, 6)
    assert sum(plan.sizes) == 500 and all(plan.sizes) and len(set(plan.digests)) == 6
    shuffled = table.take(np.random.default_rng(1).permutation(500))
    blocks = ray.data.from_arrow([shuffled.slice(i, 70) for i in range(0, 500, 70)])
    assert plan_dataset(blocks, 6) == plan
    assert plan_table(table, 7).fingerprint == plan.fingerprint  # the data's address ignores the layout
    edited = table.set_column(1, "text", pa.array(["changed"] + table.column("text").to_pylist()[1:]))
    assert plan_table(edited, 6).fingerprint != plan.fingerprint
    assert sum(a != b for a, b in zip(plan_table(edited, 6).digests, plan.digests)) == 1  # one chunk changed


@pytest.mark.e2e
def test_complete_cache_is_reused_without_loading_the_teacher(ray_local, tmp_path):
    model = build_tiny_bert(tmp_path / "teacher")
    table = text_table(100)
    cfg = teacher_cfg(model)
    first = build_cache(table, cfg, tmp_path / "cache").embeddings()
    shutil.rmtree(model)  # any attempt to load the teacher now fails
    again = build_cache(table, cfg, tmp_path / "cache")
    np.testing.assert_array_equal(again.embeddings(), first)


@pytest.mark.e2e
def test_teacher_embeddings_returns_input_order(ray_local, tiny_teacher, tmp_path):
    table = text_table(90, seed=3)
    cfg = teacher_cfg(tiny_teacher)
    reordered = table.take(np.random.default_rng(0).permutation(len(table)))
    direct = teacher_embeddings(table, cfg, tmp_path)
    shuffled = teacher_embeddings(reordered, cfg, tmp_path)
    position = {i: n for n, i in enumerate(table.column("id").to_pylist())}
    expected = direct[[position[i] for i in reordered.column("id").to_pylist()]]
    np.testing.assert_allclose(shuffled, expected, atol=1e-6)


@pytest.mark.e2e
def test_damaged_part_is_recomputed_alone_or_refused(ray_local, tiny_teacher, tmp_path):
    table = text_table(200)
    cfg = teacher_cfg(tiny_teacher)
    cache = build_cache(table, cfg, tmp_path)
    reference = cache.embeddings()
    part = cache.part_path(1)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated parquet
    with pytest.raises(CacheDamagedError, match="part-00001"):
        build_cache(table, cfg.model_copy(update={"on_damaged_cache": "error"}), tmp_path)
    with pytest.raises(CacheDamagedError, match="damaged"):
        TeacherCache.load(cache.path)
    repaired = build_cache(table, cfg, tmp_path)
    assert repaired.manifest["last_run"]["chunks_computed"] == 1
    assert repaired.manifest["last_run"]["chunks_reused"] == cache.chunks - 1
    np.testing.assert_allclose(repaired.embeddings(), reference, atol=1e-6)
    # a whole part holding another chunk's rows does not count either (its footer digest is that chunk's)
    shutil.copyfile(cache.part_path(0), cache.part_path(2))
    assert not repaired.chunk_ok(2) and repaired.missing_chunks() == [2]


@pytest.mark.e2e
def test_mismatched_cache_is_refused(ray_local, tmp_path):
    model = tmp_path / "teacher"
    table = text_table(130)
    cfg = teacher_cfg(build_tiny_bert(model, hidden=32))
    cache = build_cache(table, cfg, tmp_path / "cache")
    # another teacher's settings at the same place
    with pytest.raises(CacheMismatchError, match="another teacher"):
        TeacherCache.open(cache.path, cfg.model_copy(update={"query_prompt": "risk "}),
                          plan_table(table, cache.chunks), cfg.chunk_rows)
    # the weights behind the same model path changed dimension while a part was missing
    cache.part_path(0).unlink()
    shutil.rmtree(model)
    build_tiny_bert(model, hidden=48)
    with pytest.raises(CacheMismatchError, match="32-d.*48-d"):
        build_cache(table, cfg, tmp_path / "cache")


@pytest.mark.e2e
def test_interrupted_run_resumes_and_computes_only_missing_chunks(ray_local, tiny_teacher, tmp_path):
    """SIGKILL a real run after its first parts land; the rerun computes only the rest."""
    n, chunk = 1200, 40
    table = text_table(n, seed=5)
    pa.parquet.write_table(table, tmp_path / "texts.parquet")
    cfg = teacher_cfg(tiny_teacher, chunk_rows=chunk, batch_size=8)
    cache_dir = cache_path_for(table, cfg, tmp_path / "cache")
    script = textwrap.dedent(f"""
        import json, sys, pyarrow.parquet as pq, ray
        sys.path.insert(0, {str(REPO)!r})
        from leaf_ray.config import TeacherConfig
        from leaf_ray.teacher import build_cache
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        cfg = TeacherConfig.model_validate_json({cfg.model_dump_json()!r})
        build_cache(pq.read_table({str(tmp_path / "texts.parquet")!r}), cfg, {str(tmp_path / "cache")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(cache_dir.glob("part-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    ray_processes = psutil.Process(proc.pid).children(recursive=True)  # its raylet and workers
    os.killpg(proc.pid, signal.SIGKILL)
    for child in ray_processes:  # any that left the session too: no part may land after the count below
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(ray_processes, timeout=30)
    kept = sorted(int(p.stem.split("-")[1]) for p in cache_dir.glob("part-*.parquet"))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    done = len(kept)
    assert 2 <= done < manifest["chunks"] and not manifest["complete"], "the run was not interrupted mid-stage"

    resumed = build_cache(table, cfg, tmp_path / "cache")
    stats = resumed.manifest["last_run"]
    assert stats["chunks_reused"] == done and stats["chunks_computed"] == resumed.chunks - done
    assert stats["rows_computed"] == n - sum(resumed.chunk_rows_of(i) for i in kept)
    fresh = build_cache(table, cfg, tmp_path / "fresh")
    ids = table.column("id").to_pylist()
    np.testing.assert_allclose(resumed.vectors_for(ids), fresh.vectors_for(ids), atol=1e-6)
    assert sorted(resumed.read_table(["id"]).column("id").to_pylist()) == sorted(ids)


def test_teacher_output_checks():
    good = np.ones((2, 3), dtype=np.float32)
    assert check_vectors(good, 2, 3, "t") is good
    with pytest.raises(TeacherOutputError, match="shape"):
        check_vectors(good, 2, 4, "t")
    bad = good.copy()
    bad[1, 0] = np.nan
    with pytest.raises(TeacherOutputError, match="NaN/Inf for 1 of 2"):
        check_vectors(bad, 2, 3, "t")


@pytest.mark.slow
@pytest.mark.e2e
def test_bundled_minilm_on_train_text_equals_sentence_transformers(ray_local, data_root, tmp_path):
    """1,000 real texts through the stage equal plain sentence-transformers with the same prompts."""
    from leaf_ray.models import MINILM_ID, ModelStore

    data = DataConfig(root=str(data_root), sources=[DataSource(path="train-text/texts.jsonl.gz", limit_queries=800,
                                                               limit_documents=200)])
    texts, _ = build_mix(data)
    table = collect(texts)
    assert len(table) == 1000
    cfg = TeacherConfig(model=MINILM_ID, query_prompt="query: ", document_prompt="", max_length=256,
                        chunk_rows=256, torch_threads=2)
    cache = build_cache(texts, cfg, tmp_path)
    ids = cache.read_table().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 1000 and set(ids) == set(table.column("id").to_pylist())
    expected = plain_encode(ModelStore().resolve(MINILM_ID), table, cfg)
    assert cosines(cache.vectors_for(table.column("id").to_pylist()), expected).min() > 0.9999


def test_a_cache_of_an_older_layout_is_refused_by_name(tmp_path):
    """A manifest whose `chunking` is not today's (parts laid out by another hash) is never reused or replanned."""
    table = text_table(40)
    cfg = teacher_cfg(tmp_path / "teacher")
    plan = plan_table(table, 1)
    cache = TeacherCache.open(tmp_path / "cache", cfg, plan, cfg.chunk_rows)
    manifest = tmp_path / "cache" / "manifest.json"
    manifest.write_text(json.dumps(cache.manifest | {"chunking": "rows in input order"}))
    assert TeacherCache.existing_chunks(tmp_path / "cache") is None
    with pytest.raises(CacheMismatchError, match="older part layout"):
        TeacherCache.open(tmp_path / "cache", cfg, plan, cfg.chunk_rows)
