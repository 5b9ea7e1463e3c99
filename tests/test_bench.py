"""Benchmark scripts on tiny models and a slice of SciFact: each runs end to end and writes well-formed JSON with
the expected keys (timings are not checked); the ONNX serving path gives PyTorch's vectors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from leaf_ray.bench import alternating, median_ratios
from leaf_ray.config import StudentConfig
from leaf_ray.onnx_export import OnnxEncoder, OnnxExportError, export_onnx
from leaf_ray.student import (
    build_student,
    export_student,
    load_student,
    student_manifest,
)

from .conftest import (
    DATA_ROOT,
    REPO,
    TEACHER_PROMPTS,
    build_tiny_mpnet,
    random_texts,
    run_in_process,
    tiny_teacher_config,
)

TEACHER_DIM = 32  # the tiny teacher's hidden size


def run_script(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "LEAF_DATA_DIR": str(DATA_ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def scifact_slice(tmp_path_factory) -> Path:
    """A BEIR folder cut from SciFact: 12 test queries, their judged documents and 40 others."""
    source, folder = DATA_ROOT / "scifact", tmp_path_factory.mktemp("scifact_slice")
    qrels = [line.split("\t") for line in (source / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    queries = list(dict.fromkeys(q for q, _, _ in qrels))[:12]
    judged = {d for q, d, _ in qrels if q in queries}
    corpus = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
    kept = [doc for doc in corpus if doc["_id"] in judged] + [doc for doc in corpus if doc["_id"] not in judged][:40]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in kept))
    query_rows = [json.loads(line) for line in (source / "queries.jsonl").read_text().splitlines()]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in query_rows if q["_id"] in queries))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        "\t".join(row) + "\n" for row in qrels if row[0] in queries))
    return folder


@pytest.fixture(scope="module")
def tiny_student(tiny_teacher, tmp_path_factory) -> Path:
    """A student directory whose manifest names the tiny teacher (2 of its 4 layers + a Dense head, prompts)."""
    teacher = tiny_teacher_config(tiny_teacher)
    cfg = StudentConfig(kind="teacher_layers", layers=[0, 2], max_length=64, projection_init="random")
    model = build_student(cfg, teacher, TEACHER_DIM)
    return export_student(model, tmp_path_factory.mktemp("student") / "student",
                          student_manifest(cfg, teacher, TEACHER_DIM, None))


@pytest.fixture(scope="module")
def tiny_mpnet(tiny_teacher, tmp_path_factory):
    """A plain Hugging Face MPNet (the replica teacher's architecture: relative attention bias, no token types),
    loaded with mean pooling and given query/document prompts."""
    from sentence_transformers import SentenceTransformer

    directory = build_tiny_mpnet(tmp_path_factory.mktemp("tiny_mpnet"), tiny_teacher, layers=2)
    model = SentenceTransformer(str(directory), device="cpu", prompts=TEACHER_PROMPTS)
    model.max_seq_length = 48
    return model


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fuse", [False, True], ids=["exported", "fused"])
def test_onnx_vectors_equal_pytorch(tiny_mpnet, tmp_path, fuse):
    """The BERT + Dense student path is checked the same way inside the serving script (test below)."""
    encoder = OnnxEncoder(export_onnx(tiny_mpnet, tmp_path / "onnx", fuse=fuse), threads=1)
    assert bool(encoder.fusions) == fuse
    assert [p.name for p in (tmp_path / "onnx").glob("*.onnx")] == ["model.onnx"]  # the unfused graph is removed
    texts = random_texts(20, seed=3, min_words=1, max_words=90)  # some longer than max_seq_length: truncated
    for prompt_name in ("query", "document"):
        expected = tiny_mpnet.encode(texts, prompt_name=prompt_name, batch_size=7)
        got = encoder.encode(texts, prompt_name=prompt_name, batch_size=7)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(encoder.encode(texts[0]), tiny_mpnet.encode(texts[0]), atol=1e-5)  # a str: one vector
    assert encoder.prompts == TEACHER_PROMPTS
    with pytest.raises(OnnxExportError, match="prompt_name 'passage'"):
        encoder.encode(texts, prompt_name="passage")


@pytest.mark.timeout(300)
def test_fused_bert_student_runs_onnxruntime_attention_with_the_same_vectors(tiny_student, tmp_path):
    student = load_student(tiny_student)
    encoder = OnnxEncoder(export_onnx(student, tmp_path / "onnx"), threads=1)
    assert {"attention", "skip_layer_normalization", "bias_gelu"} <= set(encoder.fusions)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= ops
    texts = random_texts(16, seed=4, min_words=1, max_words=80)
    np.testing.assert_allclose(encoder.encode(texts, prompt_name="query", batch_size=5),
                               student.encode(texts, prompt_name="query", batch_size=5), atol=1e-5)


def test_onnx_refuses_what_it_cannot_reproduce(tiny_student, tmp_path):
    model = load_student(tiny_student)
    model[1].include_prompt = False
    with pytest.raises(OnnxExportError, match="include_prompt=False"):
        export_onnx(model, tmp_path / "onnx")
    with pytest.raises(OnnxExportError, match="no leaf_onnx.json"):
        OnnxEncoder(tmp_path)


def test_ratios_are_taken_within_each_round_then_their_median():
    """A slow round slows both sides of its ratio: per-round ratios 2, 1, 1.5 give 1.5, where the ratio of the
    median rates (20 / 10) would give 2."""
    runs = {"base": [{"rate": 10.0}, {"rate": 5.0}, {"rate": 20.0}], "x": [{"rate": 20.0}, {"rate": 5.0}, {"rate": 30.0}]}
    assert median_ratios(runs, "base", "rate") == {"base": 1.0, "x": 1.5}
    assert alternating(["a", "b", "c"], 0) == ["a", "b", "c"] and alternating(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_flops_follow_the_encoder_shape_and_measured_token_counts(tiny_student):
    from leaf_ray.bench import EncoderShape, matmul_gflops, token_counts

    # one layer, hidden 2, feed-forward 4, 3 tokens: 8*3*2^2 + 4*3*2*4 + 4*3^2*2 = 264, plus a 2->5 head: 20
    assert EncoderShape(1, 2, 4, ((2, 5),)).flops([3]).tolist() == [284.0]
    student = load_student(tiny_student)
    shape = EncoderShape.of(student)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads) == (2, 32, 64, ((32, TEACHER_DIM),))
    plain, prompted = token_counts(student, ["gene study", "x " * 200]), token_counts(student, ["gene study"], "the study ")
    assert plain.tolist() == [4, 64] and prompted.tolist() == [6]  # [CLS] gene study [SEP]; truncated at 64
    assert matmul_gflops(64, 32, 64, repeats=2) > 0


@pytest.fixture(scope="module")
def serving_result(tiny_student, scifact_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "serving.json"
    run_script("bench/serving.py", str(tiny_student), "--dataset", str(scifact_slice), "--docs", "16",
               "--queries", "12", "--latency-queries", "4", "--rounds", "1", "--query-rounds", "2", "--check-texts", "8",
               "--threads", "1", "--max-length", "24", "--out", str(out))
    return out


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_serving_script_writes_speedups_agreement_and_physical_limit(serving_result):
    report = json.loads(serving_result.read_text())
    assert report["benchmark"] == "serving" and report["docs_speedup"] > 0 and report["queries_speedup"] > 0
    paths = {"pytorch", "onnx", "onnx-fused"}
    assert set(report["speed"]) == {f"{name}/{path}" for name in ("teacher", "student") for path in paths}
    for row in report["speed"].values():
        assert {"docs_per_s", "queries_per_s", "query_latency_p50_ms", "query_latency_p95_ms"} <= set(row)
        assert len(row["rounds"]["docs_per_s"]) == 1 and len(row["rounds"]["queries_per_s"]) == 2
        assert row["queries_per_s"] == pytest.approx(sum(row["rounds"]["queries_per_s"]) / 2, abs=0.01)  # the median
    # --max-length: both models truncate alike, so neither reads fewer tokens per document than the other
    assert report["setup"]["max_length"] == {"teacher": 24, "student": 24}
    tokens = report["physical_limit"]["mean_tokens"]
    assert max(tokens[name]["docs"] for name in tokens) <= 24
    assert report["params"]["teacher"] > report["params"]["total"] > 0 and report["params"]["ratio"] > 1
    for checks in report["onnx_agreement"].values():
        assert checks["query"]["min_cosine"] > 0.9999 and checks["document"]["max_abs_diff"] < 1e-4
    limit = report["physical_limit"]
    for unit in ("flops_per_doc", "flops_per_query"):  # the leaf (2 of the teacher's 4 layers) costs less per text
        assert limit[unit]["teacher"] > limit[unit]["student"] > 0
    assert limit["flops_ratio"]["docs"] > 1 and limit["matmul_gflops"]["student"] > 0
    assert set(limit["fraction_of_limit"]["teacher"]) == paths
    assert {report["best_path"]["student"][k]["path"] for k in ("docs", "queries")} <= paths
    assert "attention" in report["setup"]["onnx_fusions"]["student/onnx-fused"]
    assert report["setup"]["onnx_fusions"]["student/onnx"] == {}
    for row in report["query_time_breakdown"].values():
        assert 0 < row["tokenize_share"] < 1 and 0 < row["kernel_share"] <= 1.05 and "MatMul" in row["op_shares"]
    assert serving_result.with_suffix(".png").stat().st_size > 0


@pytest.mark.timeout(400)
@pytest.mark.e2e
def test_teacher_backends_script_runs_onnx_beside_pytorch_in_alternating_rounds(tiny_teacher, tmp_path):
    out = tmp_path / "backends.json"
    run_script("bench/teacher_backends.py", "--model", str(tiny_teacher), "--texts", "60", "--rounds", "2",
               "--threads", "1", "--max-length", "64", "--out", str(out))
    report = json.loads(out.read_text())
    assert {name: [run["round"] for run in runs] for name, runs in report["runs"].items()} == {
        "transformers": [0, 1], "onnx": [0, 1]}
    assert all(run["rows"] == report["texts"] == 60 for runs in report["runs"].values() for run in runs)
    assert report["min_cosine_vs_transformers"]["onnx"] >= 0.9999  # the cached vectors are PyTorch's
    assert report["steady_vs_transformers"]["transformers"] == 1.0 and report["steady_vs_transformers"]["onnx"] > 0
    assert report["prepared_before_rounds"]["onnx_export_s"] > 0


@pytest.fixture(scope="module")
def peers_result(ray_local, tiny_teacher, scifact_slice, tmp_path_factory) -> Path:
    """bench/peers.py run in this process on the session's Ray (it sets torch's thread count for its in-process
    peers: restored after)."""
    import torch

    tmp = tmp_path_factory.mktemp("peers")
    texts = tmp / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": f"t{i}", "text": t, "kind": "query" if i % 4 else "document"}) + "\n"
                             for i, t in enumerate(random_texts(200, seed=5))))
    config = {
        "name": "tiny-peers",
        "data": {"root": str(DATA_ROOT), "validation_size": 16, "sources": [{"path": str(texts)}]},
        "teacher": {"model": str(tiny_teacher), "query_prompt": "query: ", "max_length": 64, "batch_size": 32,
                    "num_cpus_per_actor": 0.5, "torch_threads": 1},
        "student": {"kind": "teacher_layers", "layers": [0, 2], "max_length": 64, "projection_init": "random"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-4, "warmup_steps": 2, "num_workers": 1,
                  "cpus_per_worker": 0.5, "torch_threads": 1},
        "evaluate": {"datasets": [str(scifact_slice)], "sts": None, "batch_size": 32},
        "ray": {"num_cpus": 2},
        "storage": {"cache_root": str(tmp / "cache"), "runs_root": str(tmp / "unused")},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = tmp / "peers.json"
    threads = torch.get_num_threads()
    try:
        run_in_process("bench/peers.py", "--config", str(tmp / "tiny.yaml"), "--work", str(tmp / "work"), "--docs",
                       "8", "--queries", "8", "--rounds", "1", "--train-rounds", "2", "--out", str(out))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.timeout(600)
@pytest.mark.e2e
def test_peers_script_trains_both_recipes_on_one_budget_and_distills_model2vec(peers_result):
    report = json.loads(peers_result.read_text())
    results = report["results"]
    assert set(results) == {"leaf-ray", "sentence-transformers", "model2vec"}
    leaf, st, m2v = results["leaf-ray"], results["sentence-transformers"], results["model2vec"]
    assert leaf["steps"] == st["steps"] == leaf["steps_trained"] == (200 - 16) // 16
    for row in (leaf, st):  # both peers train: closer to the teacher on held-out rows than where they started
        assert row["wall_s"] > 0 and report["shared"]["init_val_cosine"] < row["val_cosine"] <= 1
        assert all(0 <= row["ndcg_at_10"][mode] <= 1 for mode in ("standard", "asymmetric"))
    assert m2v["distill_s"] > 0 and 0 <= m2v["ndcg_at_10"]["standard"] <= 1
    assert m2v["ndcg_at_10"]["asymmetric"] is None and "impossible" in m2v["asymmetric_note"]
    assert set(report["speed"]) == {"teacher", "leaf-ray", "model2vec"}
    assert report["speed"]["model2vec"]["docs_per_s"] > 0
    assert set(report["goal"]) == {"leaf_wall_le_st", "leaf_ndcg_ge_st"}
    # two timing rounds in alternating order, the second leaf-ray run trained from the copied initial student
    assert [r["round"] for r in leaf["rounds"]] == [r["round"] for r in st["rounds"]] == [0, 1]
    second = json.loads(next((peers_result.parent / "work" / "runs").glob("*-r1/metrics.jsonl")).read_text()
                        .splitlines()[-1])
    assert second["event"] == "end" and second["step"] == leaf["steps"]
    assert report["wall_time"]["st_over_leaf_median_per_round"] > 0
    assert 0 <= report["teacher"]["ndcg_at_10"] <= 1 and report["shared"]["teacher_vectors_s"] > 0
    assert peers_result.with_suffix(".png").stat().st_size > 0


@pytest.mark.timeout(120)
@pytest.mark.e2e
def test_report_collects_every_result_into_one_page(serving_result, peers_result, tmp_path):
    for path in [*(REPO / "bench" / "results").glob("*.json"), serving_result, peers_result,
                 serving_result.with_suffix(".png")]:
        shutil.copy(path, tmp_path / path.name)
    run_script("bench/report.py", "--results", str(tmp_path))
    page = (tmp_path / "README.md").read_text()
    for title in ("Serving: leaf vs teacher", "Peers: sentence-transformers and Model2Vec",
                  "Teacher stage: Ray Data vs a plain loop", "Training: Ray Train vs a plain loop"):
        assert title in page
    assert "docs_speedup" in page and "![serving](serving.png)" in page and "| model2vec |" in page
    (tmp_path / "broken.json").write_text(json.dumps({"benchmark": "serving"}))
    proc = subprocess.run([sys.executable, "bench/report.py", "--results", str(tmp_path)], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "broken.json: missing or malformed field" in proc.stderr
