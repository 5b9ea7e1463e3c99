"""Model cards of exported leaves, and the asymmetric pair (queries -> leaf, documents -> teacher) as one model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard

from leaf_ray.asym import ASYM_DIR, AsymmetricExportError, export_asymmetric
from leaf_ray.config import RunConfig, StudentConfig, TrainConfig
from leaf_ray.evaluate import EvaluationResult, bytes_per_vector, student_prompts
from leaf_ray.evaluate.sources import sentence_transformer_source
from leaf_ray.model_card import CARD_NAME, leaf_card
from leaf_ray.models import ModelStore
from leaf_ray.recipe import LeafRun
from leaf_ray.student import (build_student, export_student, read_manifest, safetensors_parameter_count,
                              student_manifest, teacher_prompts)

from .conftest import REPO, build_tiny_bert, tiny_teacher_config

TEACHER_DIM = 32  # the tiny teacher's hidden size
TEXTS = ["protein expression in mouse cells", "risk of treatment", "the"]
SUMMARY = {"text_mix": {"read": {"tiny-mix": 120}, "kept": {"query": 80, "document": 30}, "dropped_empty": 1,
                        "dropped_duplicate_text": 9, "dropped_duplicate_id": 0},
           "train": {"step": 12, "samples": 384, "epoch": 1, "val_cosine": 0.875, "val_loss": 0.25}}


def metric_records() -> list[dict]:
    """Records as leaf_ray.evaluate writes them, each value distinct: retrieval and STS, every mode, at the full
    dims and a Matryoshka cut, float32 and int8, the card's metric and one it leaves out."""
    records, value = [], 0.1
    for dataset, task, metrics in (("scifact", "retrieval", ("ndcg_at_10", "recall_at_10")),
                                   ("stsbenchmark", "sts", ("cosine_spearman", "cosine_pearson"))):
        for mode in ("teacher", "student", "asymmetric"):
            for dims in (TEACHER_DIM, 16):
                for quantization in ("float32", "int8"):
                    for metric in metrics:
                        value += 0.001
                        records.append({"dataset": dataset, "split": "test", "task": task, "mode": mode,
                                        "dims": dims, "quantization": quantization,
                                        "bytes_per_vector": bytes_per_vector(dims, quantization), "metric": metric,
                                        "value": round(value, 4)})
    return records


def expected_index(records: list[dict], modes: dict[str, str]) -> dict[tuple, float]:
    """(dataset, split, metric type) -> value of the records a card reports: nDCG@10 / cosine Spearman, float32,
    full dims, for `modes` (mode -> metric-type prefix)."""
    card_metric = {"retrieval": "ndcg_at_10", "sts": "cosine_spearman"}
    return {(r["dataset"], r["split"], modes[r["mode"]] + r["metric"]): r["value"] for r in records
            if r["mode"] in modes and r["metric"] == card_metric[r["task"]] and r["quantization"] == "float32"
            and r["dims"] == TEACHER_DIM}


def model_index(card: ModelCard) -> dict[tuple, float]:
    return {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}


@pytest.fixture(scope="module")
def leaf(tiny_teacher, tmp_path_factory):
    """An exported leaf: a 24-d tiny BERT encoder projected to the tiny teacher's 32 dims, as training exports it."""
    root = tmp_path_factory.mktemp("leaf")
    encoder = build_tiny_bert(root / "encoder", hidden=24, layers=1, seed=1)
    cfg = StudentConfig(kind="pretrained", model=str(encoder), max_length=64, projection_init="random")
    teacher = tiny_teacher_config(tiny_teacher)
    student = build_student(cfg, teacher, TEACHER_DIM)
    manifest = student_manifest(cfg, teacher, TEACHER_DIM, safetensors_parameter_count(tiny_teacher))
    return export_student(student, root / "student", {**manifest, "run": "tiny", "train": TrainConfig().model_dump()})


def finished_run(tiny_teacher, leaf, tmp_path, **export):
    """A LeafRun over the tiny teacher whose trained student is `leaf`, finished on hand-made records."""
    cfg = RunConfig(name="tiny", teacher=tiny_teacher_config(tiny_teacher), export=export,
                    data={"sources": [{"path": "mix.jsonl", "name": "tiny-mix", "limit_queries": 80}]},
                    storage={"runs_root": str(tmp_path / "runs"), "cache_root": str(tmp_path / "cache")})
    run = LeafRun(cfg)
    shutil.copytree(leaf, run.folder.path / "student")
    records = metric_records()
    paths = run.finish(EvaluationResult(records, [], {}), "tiny run", SUMMARY)
    return run, records, paths


@pytest.mark.parametrize("student, teacher, base", [
    ({"kind": "teacher_layers", "layers": [0, 3]}, "org/tiny-teacher", "org/tiny-teacher"),
    ({"kind": "pretrained", "model": "org/tiny-encoder"}, "org/tiny-teacher", "org/tiny-encoder"),
    ({"kind": "fresh"}, "org/tiny-teacher", None),
    ({"kind": "teacher_layers", "layers": [0]}, str(REPO), None),  # a local path is no Hub id
])
def test_base_model_is_the_encoders_source(leaf, tmp_path, student, teacher, base):
    manifest = read_manifest(leaf)
    manifest |= {"student": manifest["student"] | student, "teacher": manifest["teacher"] | {"model": teacher}}
    leaf_card(manifest, metric_records()).save(tmp_path / CARD_NAME)
    card = ModelCard.load(tmp_path / CARD_NAME)
    assert card.data.base_model == base and card.data.teacher == teacher
    assert ("org/tiny-teacher" in card.data.tags) == (teacher == "org/tiny-teacher")


def test_finished_run_writes_the_leaf_card(tiny_teacher, leaf, tmp_path):
    run, records, paths = finished_run(tiny_teacher, leaf, tmp_path, license="apache-2.0")
    student = run.folder.path / "student"
    card = ModelCard.load(student / CARD_NAME)

    assert (card.data.library_name, card.data.pipeline_tag) == ("sentence-transformers", "sentence-similarity")
    assert card.data.license == "apache-2.0" and card.data.teacher == str(tiny_teacher)
    assert card.data.base_model is None  # the encoder came from a local path
    assert {"sentence-transformers", "feature-extraction", "leaf", "distillation"} <= set(card.data.tags)
    assert model_index(card) == expected_index(records, {"student": "", "asymmetric": "asymmetric_"})
    assert len(card.data.eval_results) == 4
    assert {r.dataset_type for r in card.data.eval_results} == {"mteb/scifact", "mteb/stsbenchmark-sts"}
    manifest = read_manifest(student)
    assert f"{manifest['param_counts']['total']:,}" in card.text and "encode_query" in card.text
    assert "mix.jsonl" in card.text and "30 document, 80 query texts kept" in card.text and "0.8750" in card.text
    assert repr(tiny_teacher_config(tiny_teacher).document_prompt) in card.text
    assert not (run.folder.path / ASYM_DIR).exists() and "asymmetric" not in paths  # off by default

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(student), device="cpu", local_files_only=True)
    original = SentenceTransformer(str(leaf), device="cpu", local_files_only=True)
    np.testing.assert_allclose(model.encode_query(TEXTS), original.encode_query(TEXTS), atol=1e-6)


LOAD_WITHOUT_LEAF_RAY = """
import json, sys
sys.modules["leaf_ray"] = None  # every import of leaf_ray now fails: the package must not need it
import numpy as np
from sentence_transformers import SentenceTransformer
path, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = SentenceTransformer(path, device="cpu", local_files_only=True, model_kwargs={"use_safetensors": True})
np.save(out + "/q.npy", model.encode_query(texts))
np.save(out + "/d.npy", model.encode_document(texts))
"""


@pytest.mark.e2e  # a subprocess without leaf_ray, like tests/test_student.py's round trip
def test_asymmetric_pair_loads_without_leaf_ray_and_gives_the_evaluated_vectors(tiny_teacher, leaf, tmp_path):
    run, records, paths = finished_run(tiny_teacher, leaf, tmp_path, asymmetric=True)
    package = paths["asymmetric"]
    assert package == run.folder.path / ASYM_DIR
    assert not [p for p in package.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    card = ModelCard.load(package / CARD_NAME)
    assert card.data.library_name == "sentence-transformers" and card.data.teacher == str(tiny_teacher)
    assert model_index(card) == expected_index(records, {"asymmetric": ""})

    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LEAF_RAY, str(package), json.dumps(TEXTS), str(tmp_path)],
                   check=True, cwd=tmp_path)

    from sentence_transformers import SentenceTransformer

    teacher_cfg = run.cfg.teacher
    student = SentenceTransformer(str(leaf), device="cpu", local_files_only=True)
    teacher = run.models.load(teacher_cfg.model, max_length=teacher_cfg.max_length)
    ids = [str(i) for i in range(len(TEXTS))]
    # What evaluation encodes in asymmetric mode: the leaf's prompted queries, the teacher's prompted documents.
    queries = sentence_transformer_source(student, student_prompts(student, teacher_cfg), progress=False)
    documents = sentence_transformer_source(teacher, teacher_prompts(teacher_cfg), progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), queries(TEXTS, ids, "query"), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), documents(TEXTS, ids, "document"), atol=1e-5)
    assert not np.allclose(np.load(tmp_path / "q.npy"), np.load(tmp_path / "d.npy"), atol=1e-3)


def test_asymmetric_pair_refuses_a_teacher_with_its_own_code(tiny_teacher, leaf, tmp_path):
    teacher = shutil.copytree(tiny_teacher, tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "modeling.Model"}}))
    with pytest.raises(AsymmetricExportError, match="ships its own code"):
        export_asymmetric(leaf, tiny_teacher_config(teacher), tmp_path / ASYM_DIR, ModelStore(tmp_path / "store"))
    assert not (tmp_path / ASYM_DIR).exists()
