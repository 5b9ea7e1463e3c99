"""Evaluation through mteb on local data: tasks, served variants, agreement, data checks, report and job.

Unit tests use small synthetic BEIR/STS folders and bag-of-words vectors; the slow tests encode the full
SciFact test split with the bundled all-MiniLM-L6-v2 once per session and reuse it.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from leaf_ray.config import DataConfig, EvalConfig, TeacherConfig
from leaf_ray.data import DataError
from leaf_ray.evaluate import (
    EvaluationError,
    Quantizer,
    TeacherCacheSource,
    build_sources,
    bytes_per_vector,
    derive,
    encode_once,
    evaluate_retrieval,
    evaluate_sts,
    load_beir,
    load_sts,
    mean_cosine,
    overlap_at_k,
    resolve_teacher,
    retrieval_task,
    run_evaluation,
    run_retrieval,
    truncate,
    variants,
)
from leaf_ray.report import markdown_table, write_report
from tests.conftest import REAL_VECTORS_CACHE, build_tiny_bert

pytestmark = pytest.mark.timeout(600)
QUANTS = ["float32", "int8", "binary"]


# ---------------------------------------------------------------------------------------------- helpers


def write_beir(folder: Path, docs: dict[str, str], queries: dict[str, str], qrels: list[tuple[str, str, int]],
               split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                 for i, t in docs.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                   + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return folder


def topic_beir(folder: Path, n_docs: int = 40, n_queries: int = 10, extra_qrels=()) -> Path:
    """Document i is about topic i; query i asks about topic i (and is judged relevant to document i)."""
    docs = {f"d{i}": f"topic{i} subject{i} about{i} common words here" for i in range(n_docs)}
    queries = {f"q{i}": f"topic{i} subject{i}" for i in range(n_queries)}
    return write_beir(folder, docs, queries, [(f"q{i}", f"d{i}", 1) for i in range(n_queries)] + list(extra_qrels))


def bag_of_words(texts: list[str], ids: list[str], kind: str, dim: int = 64) -> np.ndarray:
    """Deterministic word vectors summed: texts sharing words are close (a stand-in encoder)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row] += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim)
    return out


def rotated(source, dim: int, seed: int = 0):
    """The same encoder seen through a random orthogonal rotation: a student in the wrong space."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return lambda texts, ids, kind: source(texts, ids, kind) @ q.astype(np.float32)


def pick(records: list[dict], **where) -> list[dict]:
    return [r for r in records if all(r[k] == v for k, v in where.items())]


def value(records: list[dict], **where) -> float:
    (found,) = pick(records, **where)
    return found["value"]


def pytrec_mean(qrels: dict, run: dict, measure: str = "ndcg_cut_10") -> float:
    import pytrec_eval

    per_query = pytrec_eval.RelevanceEvaluator(qrels, {measure}).evaluate(run)
    return float(np.mean([s[measure] for s in per_query.values()]))


# ---------------------------------------------------------------------------------------------- data checks


def test_qrels_naming_unknown_queries_and_documents_are_counted_not_dropped_silently(tmp_path, caplog):
    folder = topic_beir(tmp_path / "toy", extra_qrels=[("q1", "d_missing", 1), ("q_missing", "d1", 1),
                                                       ("q_missing", "d2", 1)])
    data = load_beir(folder)
    assert data.issues == {"unknown_query_qrels": 2, "unknown_document_qrels": 1}
    assert "q_missing" not in data.qrels and data.qrels["q1"] == {"d1": 1, "d_missing": 1}
    assert "2 qrels rows name queries not in queries.jsonl" in caplog.text
    result = run_evaluation(EvalConfig(datasets=[str(folder)], sts=None, quantizations=["float32"]),
                            {"teacher": bag_of_words}, DataConfig(), progress=False)
    assert result.datasets[0]["unknown_query_qrels"] == 2 and result.datasets[0]["unknown_document_qrels"] == 1
    assert any("2 qrels rows name unknown queries" in n for n in result.notes())
    assert any("1 qrels rows name unknown documents" in n for n in result.notes())


def test_unknown_relevant_documents_count_as_misses(tmp_path):
    folder = topic_beir(tmp_path / "toy", n_queries=2, extra_qrels=[("q1", "d_missing", 1)])
    records = evaluate_retrieval(load_beir(folder), {"teacher": bag_of_words}, progress=False)
    # q0 is perfect (1.0); q1 finds its one findable relevant document first: DCG 1, ideal 1 + 1/log2(3)
    expected = (1.0 + 1.0 / (1.0 + 1.0 / math.log2(3))) / 2
    assert value(records, mode="teacher", metric="ndcg_at_10") == pytest.approx(expected, abs=1e-9)


def test_empty_corpus_missing_split_and_duplicate_ids_are_clear_errors(tmp_path):
    empty = write_beir(tmp_path / "empty", {}, {"q0": "x"}, [("q0", "d0", 1)])
    with pytest.raises(EvaluationError, match="corpus is empty"):
        load_beir(empty)
    toy = topic_beir(tmp_path / "toy")
    with pytest.raises(EvaluationError, match=r"no qrels for split 'dev'.*\['test'\]"):
        load_beir(toy, "dev")
    dup = write_beir(tmp_path / "dup", {"d0": "a"}, {"q0": "a"}, [("q0", "d0", 1)])
    with (dup / "corpus.jsonl").open("a") as handle:
        handle.write(json.dumps({"_id": "d0", "text": "again"}) + "\n")
    with pytest.raises(EvaluationError, match="1 duplicate document ids"):
        load_beir(dup)
    nothing = write_beir(tmp_path / "nothing", {"d0": "a"}, {"q0": "a"}, [("q9", "d0", 1)])
    with pytest.raises(EvaluationError, match="no qrels name a query"):
        load_beir(nothing)


def test_subsamples_keep_judged_documents(tmp_path):
    data = load_beir(topic_beir(tmp_path / "toy", n_docs=100, n_queries=20), max_corpus=30, max_queries=5, seed=1)
    assert len(data.query_ids) == 5 and len(data.corpus_ids) == 30
    judged = {d for rel in data.qrels.values() for d in rel}
    assert judged <= set(data.corpus_ids)


# ---------------------------------------------------------------------------------------------- mteb scoring


def test_mteb_scores_the_served_run_like_pytrec_eval_at_full_precision(tmp_path):
    data = load_beir(topic_beir(tmp_path / "toy", n_docs=60, n_queries=15,
                                extra_qrels=[(f"q{i}", f"d{i + 20}", 1) for i in range(15)]))
    task = retrieval_task(data)
    task.load_data()
    vectors = {k: truncate(bag_of_words(t, [], k, dim=16), 16) for k, t in (("q", data.query_texts),
                                                                             ("d", data.corpus_texts))}
    scores, served = run_retrieval(task, data, "toy-check", vectors["q"], vectors["d"])
    exact = pytrec_mean(data.qrels, served.run)
    assert 0 < exact < 1 and round(exact, 5) != exact  # a value mteb's own rounding would have changed
    assert scores["ndcg_at_10"] == pytest.approx(exact, abs=1e-12)
    assert scores["main_score"] == scores["ndcg_at_10"]
    assert [served.ranking[q][0] for q in data.query_ids[:3]] == [
        max(served.run[q], key=served.run[q].get) for q in data.query_ids[:3]]


def test_student_equal_to_teacher_gives_identical_modes_and_full_overlap(tmp_path):
    data = load_beir(topic_beir(tmp_path / "toy"))
    records = evaluate_retrieval(data, {"teacher": bag_of_words, "student": bag_of_words}, dims=[32, 16],
                                 quantizations=QUANTS, progress=False)
    for dims, quant in variants(64, [32, 16], QUANTS):
        ndcg = {m: value(records, mode=m, dims=dims, quantization=quant, metric="ndcg_at_10")
                for m in ("teacher", "student", "asymmetric")}
        assert len(set(ndcg.values())) == 1, (dims, quant, ndcg)
        for mode in ("student", "asymmetric"):
            assert value(records, mode=mode, dims=dims, quantization=quant, metric="overlap_at_10") == 1.0
        assert {r["bytes_per_vector"] for r in pick(records, dims=dims, quantization=quant)} == {
            bytes_per_vector(dims, quant)}
    assert value(records, mode="student", dims=64, metric="cosine_to_teacher_queries") == pytest.approx(1.0)
    assert not pick(records, mode="teacher", metric="overlap_at_10")


def test_rotated_student_keeps_its_own_ranking_but_breaks_asymmetric_mode(tmp_path):
    data = load_beir(topic_beir(tmp_path / "toy", n_docs=200, n_queries=40))
    records = evaluate_retrieval(data, {"teacher": bag_of_words, "student": rotated(bag_of_words, 64)},
                                 progress=False)
    teacher = value(records, mode="teacher", metric="ndcg_at_10")
    assert teacher > 0.9
    assert value(records, mode="student", metric="ndcg_at_10") == pytest.approx(teacher, abs=1e-3)
    assert value(records, mode="student", metric="overlap_at_10") > 0.95
    assert value(records, mode="asymmetric", metric="ndcg_at_10") < 0.2
    assert value(records, mode="asymmetric", metric="overlap_at_10") < 0.2
    assert abs(value(records, mode="student", metric="cosine_to_teacher_documents")) < 0.2


def test_each_encoder_encodes_each_text_once(tmp_path):
    calls = []

    def counting(texts, ids, kind):
        calls.append((kind, len(texts)))
        return bag_of_words(texts, ids, kind)

    data = load_beir(topic_beir(tmp_path / "toy"))
    evaluate_retrieval(data, {"teacher": counting, "student": counting}, dims=[32, 16], quantizations=QUANTS,
                       progress=False)
    assert sorted(calls) == [("document", 40), ("query", 10)]
    calls.clear()
    other = encode_once({"teacher": counting, "student": lambda *a: counting(*a)}, ["a b"], ["x"], "query")
    assert len(calls) == 2 and np.allclose(other["teacher"], other["student"])


def test_encoders_must_share_one_space(tmp_path):
    data = load_beir(topic_beir(tmp_path / "toy"))
    narrow = lambda texts, ids, kind: bag_of_words(texts, ids, kind, dim=32)  # noqa: E731
    with pytest.raises(EvaluationError, match="disagree on the dimension"):
        evaluate_retrieval(data, {"teacher": bag_of_words, "student": narrow}, progress=False)
    with pytest.raises(EvaluationError, match="need encoders"):
        evaluate_retrieval(data, {"teacher": bag_of_words}, modes={"student": ("student", "student")},
                           progress=False)


# ---------------------------------------------------------------------------------------------- variants


def test_truncate_renormalises_and_variants_are_validated():
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    t = truncate(x, 4)
    assert t.shape == (5, 4) and np.allclose(np.linalg.norm(t, axis=1), 1)
    assert np.allclose(t, x[:, :4] / np.linalg.norm(x[:, :4], axis=1, keepdims=True))
    assert variants(8, [4, 2], ["float32", "binary"]) == [(8, "float32"), (8, "binary"), (4, "float32"),
                                                         (4, "binary"), (2, "float32"), (2, "binary")]
    with pytest.raises(EvaluationError, match=r"dims \[16\]"):
        variants(8, [16], ["float32"])
    with pytest.raises(EvaluationError, match="quantizations"):
        variants(8, [], ["int4"])


def test_quantizers_store_what_they_claim_and_score_faithfully():
    rng = np.random.default_rng(0)
    docs = truncate(rng.standard_normal((500, 64)).astype(np.float32), 64)
    queries = truncate(rng.standard_normal((20, 64)).astype(np.float32), 64)
    int8 = Quantizer.fit("int8", docs)
    assert int8.codes(docs).dtype == np.int8 and int8.codes(docs).nbytes == 500 * bytes_per_vector(64, "int8")
    assert np.abs(int8(docs) - docs).max() <= int8.step.max() / 2 + 1e-6  # within half a bucket
    binary = Quantizer.fit("binary", docs)
    assert binary.codes(docs).shape == (500, 8) and bytes_per_vector(64, "binary") == 64 // 8
    q, d = derive(queries, docs, 64, "binary")
    hamming = (binary.codes(queries)[:, None, :] ^ binary.codes(docs)[None, :, :])
    hamming = np.unpackbits(hamming, axis=2).sum(axis=2).astype(np.int64)
    assert np.array_equal(q @ d.T, 64 - 2 * hamming)  # the +-1 dot product is the hamming score
    assert [bytes_per_vector(384, k) for k in QUANTS] == [1536, 384, 48]


def test_stored_codes_are_sentence_transformers_own():
    """An index built with sentence-transformers' quantize_embeddings compares the same codes, queries past the
    documents' range and a constant dimension included; 44 dims leave the last binary byte part-filled."""
    from sentence_transformers.util.quantization import quantize_embeddings

    rng = np.random.default_rng(1)
    docs = truncate(rng.standard_normal((300, 44)).astype(np.float32), 44)
    docs[:, 5] = 0.1
    queries = rng.standard_normal((30, 44)).astype(np.float32)  # not normalised: most values past the range
    assert ((queries < docs.min(axis=0)) | (queries > docs.max(axis=0))).any(axis=1).all()
    int8, binary = Quantizer.fit("int8", docs), Quantizer.fit("binary", docs)
    for vectors in (docs, queries):
        codes = int8.codes(vectors)
        assert np.array_equal(codes, quantize_embeddings(vectors, precision="int8", calibration_embeddings=docs))
        assert codes.dtype == np.int8
        codes = binary.codes(vectors)
        assert np.array_equal(codes, quantize_embeddings(vectors, precision="ubinary"))
        assert np.array_equal(codes, np.packbits(vectors > 0, axis=1))
        assert codes.shape[1] == bytes_per_vector(44, "binary")
        assert np.array_equal(binary(vectors), np.where(vectors > 0, 1.0, -1.0))
    assert np.all(int8(docs)[:, 5] == np.float32(0.1))  # a constant dimension decodes to its value
    decoded = int8(queries)  # clipped to the documents' range
    assert (decoded >= docs.min(axis=0)).all() and (decoded <= docs.max(axis=0)).all()


def test_int8_scores_rank_like_the_float_vectors():
    rng = np.random.default_rng(2)
    docs = truncate(rng.standard_normal((1000, 64)).astype(np.float32), 64)
    queries = truncate(rng.standard_normal((50, 64)).astype(np.float32), 64)
    q, d = derive(queries, docs, 64, "int8")
    exact, quantized = queries @ docs.T, q @ d.T
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(exact, quantized)) > 0.99

    def top(scores):
        return {str(i): [str(j) for j in np.argsort(-row, kind="stable")[:10]] for i, row in enumerate(scores)}

    assert overlap_at_k(top(quantized), top(exact)) >= 0.9
    assert np.mean(quantized.argmax(axis=1) == exact.argmax(axis=1)) >= 0.9


def test_agreement_metrics():
    assert overlap_at_k({"a": list("xyzw")}, {"a": list("xywv")}, k=4) == 0.75
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert mean_cosine(a, np.array([[2.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- STS


def write_sts(folder: Path, rows: list[tuple[float, str, str]], split: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"sts-{split}.csv").write_text("".join(f"genre\tfile\tyear\t{i:04d}\t{s:.3f}\t{a}\t{b}\n"
                                                     for i, (s, a, b) in enumerate(rows)))
    return folder


def test_sts_task_through_mteb_and_its_data_checks(tmp_path):
    rows = [(5.0, "a cat sits", "a cat sits"), (3.0, "a cat sits", "a cat runs"), (1.0, "a dog barks loudly",
            "the cat sits quietly"), (0.0, "red apple", "fast engine"), (4.0, 'he said "hi"', 'he said "hello"')]
    data = load_sts(write_sts(tmp_path / "sts", rows))
    assert data.sentence2[-1] == 'he said "hello"'  # quotes kept verbatim
    records = evaluate_sts(data, {"teacher": bag_of_words, "student": bag_of_words}, dims=[32],
                           quantizations=["float32", "int8"], progress=False)
    assert {(r["mode"], r["dims"], r["quantization"]) for r in records} == {
        (m, d, q) for m in ("teacher", "student", "asymmetric") for d in (64, 32) for q in ("float32", "int8")}
    spearman = value(records, mode="teacher", dims=64, quantization="float32", metric="cosine_spearman")
    assert spearman > 0.5
    assert value(records, mode="asymmetric", dims=64, quantization="float32", metric="cosine_spearman") == spearman
    with pytest.raises(EvaluationError, match=r"split 'dev'.*sts-test.csv"):
        load_sts(tmp_path / "sts", "dev")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sts-test.csv").write_text("a\tb\tc\t1\tnot-a-score\tx\ty\n")
    with pytest.raises(DataError, match="sts-test.csv:1: score 'not-a-score'"):
        load_sts(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------- report, manifest, job


def test_report_writes_json_markdown_and_plots(tmp_path):
    data = load_beir(topic_beir(tmp_path / "toy"))
    records = evaluate_retrieval(data, {"teacher": bag_of_words, "student": rotated(bag_of_words, 64)},
                                 dims=[32], quantizations=["float32", "binary"], progress=False)
    meta = {"student": "s", "data": [data.summary()], "params": {"total": 250, "teacher": 1000},
            "throughput": {"teacher": {"docs_per_s": 10.0, "queries_per_s": 20.0},
                           "student": {"docs_per_s": 40.0, "queries_per_s": 30.0}}}
    paths = write_report(tmp_path / "out", records, "toy report", meta, ["a note"])
    saved = json.loads(paths["json"].read_text())
    assert saved["records"] == records and saved["notes"] == ["a note"]
    assert all({"dataset", "split", "mode", "dims", "quantization", "bytes_per_vector", "metric", "value"} <= r.keys()
               for r in saved["records"])
    md = paths["markdown"].read_text()
    assert "| dataset | split | mode | dims | quantization | bytes_per_vector | ndcg_at_10 |" in md
    assert "- a note" in md and "documents 40" in md and "![toy_test_ndcg_at_10](plots/toy_test_ndcg_at_10.png)" in md
    # the summary a person reads first: size and speed against the teacher, and what each mode keeps of its score
    summary = md.split("## Details")[0]
    assert "4.00x fewer than the teacher's 1,000" in summary and "4.00x the teacher's documents/s" in summary
    teacher, student = (next(r["value"] for r in records if (r["mode"], r["dims"], r["quantization"], r["metric"]) ==
                             (mode, 64, "float32", "ndcg_at_10")) for mode in ("teacher", "student"))
    assert f"| toy/test | ndcg_at_10 @64d | {teacher:.4f} | {student:.4f} ({student / teacher:.1%}) |" in summary
    lines = [line for line in markdown_table(records).splitlines() if line.startswith("| toy")]
    assert len(lines) == 3 * 2 * 2 and lines[0].startswith("| toy | test | teacher | 64 | float32 | 256 |")
    png = paths["toy_test_ndcg_at_10"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_teacher_comes_from_the_manifest_unless_given(tmp_path):
    base = TeacherConfig(query_prompt="base q ")
    student = tmp_path / "student"
    student.mkdir()
    with pytest.raises(EvaluationError, match="no leaf_manifest.json"):
        resolve_teacher(student, None, base)
    (student / "leaf_manifest.json").write_text(json.dumps(
        {"teacher": {"model": "org/teacher", "query_prompt": "q: ", "document_prompt": "d: ", "unknown": 1}}))
    from_manifest = resolve_teacher(student, None, base)
    assert (from_manifest.model, from_manifest.query_prompt, from_manifest.document_prompt) == ("org/teacher", "q: ",
                                                                                                "d: ")
    assert resolve_teacher(student, "org/teacher", base).query_prompt == "q: "
    other = resolve_teacher(student, "org/other", base)
    assert (other.model, other.query_prompt) == ("org/other", "base q ")
    (student / "leaf_manifest.json").write_text("{}")
    with pytest.raises(EvaluationError, match="needs a 'teacher'"):
        resolve_teacher(student, None, base)


def test_a_student_shares_the_teacher_source_only_as_the_same_local_model(tmp_path):
    from leaf_ray.models import ModelStore

    leaf = build_tiny_bert(tmp_path / "leaf", hidden=32, layers=1)
    models = ModelStore(tmp_path / "models")
    shared = build_sources(str(leaf), TeacherConfig(model=str(leaf)), tmp_path / "cache", models)
    assert shared["student"] is shared["teacher"]  # the teacher standing in as its own student: encoded once
    # an endpoint teacher's model need not exist here, and its vectors never stand in for the student's
    remote = TeacherConfig(model="org/remote-embedder", backend="endpoint", endpoint={"base_url": "http://127.0.0.1:9"})
    sources = build_sources(str(leaf), remote, tmp_path / "cache", models)
    assert isinstance(sources["teacher"], TeacherCacheSource) and sources["student"] is not sources["teacher"]


@pytest.mark.e2e
def test_job_evaluates_a_student_dir_against_its_manifest_teacher(ray_local, tiny_teacher, tmp_path):
    from jobs.evaluate import main

    student = build_tiny_bert(tmp_path / "student", hidden=32, layers=2, seed=1)
    (student / "leaf_manifest.json").write_text(json.dumps(
        {"teacher": {"model": str(tiny_teacher), "query_prompt": "gene study ", "document_prompt": ""}}))
    words = "protein cell gene study results patients effect model data method".split()
    docs = {f"d{i}": " ".join(words[i % 10:] + words[:i % 10]) + f" {words[i % 7]}" for i in range(30)}
    beir = write_beir(tmp_path / "toybeir", docs, {f"q{i}": docs[f"d{i}"][:20] for i in range(6)},
                      [(f"q{i}", f"d{i}", 1) for i in range(6)] + [("q0", "d_gone", 1)])
    write_sts(tmp_path / "toysts", [(i * 0.5, docs[f"d{i}"], docs[f"d{i + 1}"]) for i in range(10)])
    paths = main(["--student", str(student), "--datasets", str(beir), "--out", str(tmp_path / "out"),
                  f"data.root={tmp_path}", "evaluate.sts=toysts", "evaluate.dims=[16]",
                  f"storage.cache_root={tmp_path / 'cache'}", "teacher.torch_threads=1"])
    saved = json.loads(paths["json"].read_text())
    assert saved["meta"]["teacher"] == str(tiny_teacher) and saved["meta"]["teacher_query_prompt"] == "gene study "
    combos = {(r["task"], r["mode"], r["dims"], r["quantization"]) for r in saved["records"]}
    assert len(combos) == 2 * 3 * 2 * 3
    assert saved["notes"] == ["toybeir/test: 1 qrels rows name unknown documents (kept as misses)"]
    # the teacher's vectors went through its cache, the queries, documents and STS sentences in one stage
    assert len(list((tmp_path / "cache" / "teacher").rglob("manifest.json"))) == 1
    assert {"toybeir_test_ndcg_at_10", "toysts_test_cosine_spearman"} <= paths.keys()


# ---------------------------------------------------------------------------------------------- real data (slow)


@pytest.fixture(scope="session")
def minilm_teacher(ray_local):
    """MiniLM through the project's teacher cache, kept across test runs: a cold machine encodes the SciFact corpus
    once, later runs and clones reuse the cached vectors."""
    from leaf_ray.models import MINILM_ID

    return TeacherCacheSource(TeacherConfig(model=MINILM_ID, torch_threads=2), REAL_VECTORS_CACHE)


@pytest.fixture(scope="session")
def scifact_minilm(data_root, minilm_teacher):
    """SciFact's test split and MiniLM's vectors of its queries and full corpus."""
    data = load_beir(data_root / "scifact", "test")
    return data, {kind: minilm_teacher(texts, ids, kind) for texts, ids, kind in data.requests()}


def served(data, vectors: dict[str, np.ndarray]):
    """A VectorSource answering from the session's vectors (only for the texts they were computed for)."""
    encoded = {kind: ids for _, ids, kind in data.requests()}

    def source(texts, ids, kind):
        assert list(ids) == encoded[kind]
        return vectors[kind]

    return source


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a cold teacher cache means encoding SciFact first (~4 min on 2 idle cores)
def test_minilm_as_teacher_and_student_on_scifact(scifact_minilm):
    import time

    data, vectors = scifact_minilm
    minilm = served(data, vectors)
    started = time.perf_counter()
    records = evaluate_retrieval(data, {"teacher": minilm, "student": minilm}, dims=[256, 128], quantizations=QUANTS,
                                 progress=False)
    print(f"\n27 variants evaluated in {time.perf_counter() - started:.1f}s")
    for dims, quant in variants(384, [256, 128], QUANTS):
        ndcg = {m: value(records, mode=m, dims=dims, quantization=quant, metric="ndcg_at_10")
                for m in ("teacher", "student", "asymmetric")}
        print(f"  {dims:>3}d {quant:<7} {bytes_per_vector(dims, quant):>5} B  nDCG@10 {ndcg['teacher']:.4f}")
        assert len(set(ndcg.values())) == 1
        assert value(records, mode="asymmetric", dims=dims, quantization=quant, metric="overlap_at_10") == 1.0
    full = value(records, mode="teacher", dims=384, quantization="float32", metric="ndcg_at_10")
    assert full == pytest.approx(0.6451, abs=1e-3)  # MTEB's published SciFact score for all-MiniLM-L6-v2
    assert full - value(records, mode="teacher", dims=384, quantization="int8", metric="ndcg_at_10") < 0.01
    assert {r["bytes_per_vector"] for r in pick(records, quantization="binary", dims=128)} == {16}

    task = retrieval_task(data)
    task.load_data()
    scores, search = run_retrieval(task, data, "scifact-pytrec-check", vectors["query"], vectors["document"])
    assert scores["ndcg_at_10"] == pytest.approx(full, abs=1e-12)
    assert abs(scores["ndcg_at_10"] - pytrec_mean(data.qrels, search.run)) < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a cold teacher cache means encoding SciFact first (~4 min on 2 idle cores)
def test_misaligned_student_fails_asymmetric_retrieval_on_scifact(scifact_minilm):
    data, vectors = scifact_minilm
    teacher = served(data, vectors)
    records = evaluate_retrieval(data, {"teacher": teacher, "student": rotated(teacher, 384)}, progress=False)
    teacher_ndcg = value(records, mode="teacher", metric="ndcg_at_10")
    assert value(records, mode="student", metric="ndcg_at_10") == pytest.approx(teacher_ndcg, abs=2e-3)
    assert value(records, mode="asymmetric", metric="ndcg_at_10") < 0.05
    assert value(records, mode="asymmetric", metric="overlap_at_10") < 0.05
    assert abs(value(records, mode="student", metric="cosine_to_teacher_queries")) < 0.1


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a cold teacher cache means encoding SciFact first (~4 min on 2 idle cores)
def test_minilm_on_sts_benchmark_matches_its_published_score(minilm_teacher, data_root):
    records = evaluate_sts(load_sts(data_root / "stsbenchmark", "test"), {"teacher": minilm_teacher},
                           quantizations=["float32"], progress=False)
    assert value(records, metric="cosine_spearman") == pytest.approx(0.8203, abs=5e-3)  # MTEB STSBenchmark
