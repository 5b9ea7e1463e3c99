"""Student construction (pretrained / teacher layers / fresh), projection init, parameter counts, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leaf_ray.config import StudentConfig
from leaf_ray.inputs import split_table
from leaf_ray.student import (MANIFEST_NAME, StudentError, TeacherRows, build_student, count_parameters,
                              export_student, forward_texts, freeze_unused_parameters, read_manifest,
                              safetensors_parameter_count, student_manifest, update_manifest)
from leaf_ray.train import evaluate

from .conftest import TEACHER_PROMPTS, build_tiny_bert, build_tiny_mpnet, tiny_teacher_config

TEACHER_DIM = 32  # the tiny teacher's hidden size


def layer_params(hidden: int) -> int:
    """Parameters of one tiny BERT layer (intermediate = 2 x hidden, as build_tiny_bert makes them)."""
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden
    ffn = (hidden * 2 * hidden + 2 * hidden) + (2 * hidden * hidden + hidden) + 2 * hidden
    return attention + ffn


@pytest.fixture(scope="module")
def sample(tiny_cache):
    train, held_out = split_table(tiny_cache, 48, seed=0)
    return TeacherRows.of(train), TeacherRows.of(held_out)


@pytest.fixture(scope="module")
def tiny_mpnet(tiny_teacher, tmp_path_factory) -> Path:
    return build_tiny_mpnet(tmp_path_factory.mktemp("tiny_mpnet"), tiny_teacher, layers=3)


def test_teacher_layers_keeps_chosen_layers(tiny_teacher, sample):
    cfg = StudentConfig(kind="teacher_layers", layers=[0, 2], max_length=64)
    student = build_student(cfg, tiny_teacher_config(tiny_teacher), TEACHER_DIM, sample=sample[0])
    encoder = student[0].auto_model
    assert encoder.config.num_hidden_layers == 2 and len(encoder.encoder.layer) == 2
    from transformers import AutoModel

    source = AutoModel.from_pretrained(tiny_teacher)
    for kept, original in zip(encoder.encoder.layer, (source.encoder.layer[0], source.encoder.layer[2])):
        for a, b in zip(kept.parameters(), original.parameters()):
            assert torch.equal(a, b)

    teacher_total = safetensors_parameter_count(tiny_teacher)
    counts = count_parameters(student, teacher_total)
    assert counts.encoder == teacher_total - 2 * layer_params(32)
    assert counts.projection == 32 * TEACHER_DIM + TEACHER_DIM
    assert counts.total == counts.encoder + counts.projection
    assert counts.ratio == pytest.approx(teacher_total / counts.total)
    vectors = forward_texts(student, ["a protein", "the cell gene"], ["query", "document"])
    assert vectors.shape == (2, TEACHER_DIM)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert student.prompts == TEACHER_PROMPTS


def test_teacher_layers_on_mpnet(tiny_mpnet):
    cfg = StudentConfig(kind="teacher_layers", layers=[2], max_length=64, projection_init="random")
    teacher = tiny_teacher_config(tiny_mpnet)
    student = build_student(cfg, teacher, TEACHER_DIM)
    encoder = student[0].auto_model
    assert type(encoder).__name__ == "MPNetModel" and len(encoder.encoder.layer) == 1
    assert forward_texts(student, ["the cell"], ["query"]).shape == (1, TEACHER_DIM)
    # default layer choice: evenly spaced, first and last kept
    spread = build_student(StudentConfig(kind="teacher_layers", num_layers=2, max_length=64,
                                         projection_init="random"), teacher, TEACHER_DIM)
    assert len(spread[0].auto_model.encoder.layer) == 2


def test_fresh_student_uses_teacher_tokenizer(tiny_teacher):
    cfg = StudentConfig(kind="fresh", num_layers=2, hidden_size=16, num_heads=2, intermediate_size=32,
                        max_length=64, projection_init="random")
    student = build_student(cfg, tiny_teacher_config(tiny_teacher), TEACHER_DIM)
    config = student[0].auto_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 16, 2)
    from transformers import AutoTokenizer

    assert student.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_teacher).get_vocab()
    counts = count_parameters(student)
    assert counts.projection == 16 * TEACHER_DIM + TEACHER_DIM and counts.ratio is None
    assert student[2].linear.weight.shape == (TEACHER_DIM, 16)


def test_pretrained_student_projects_to_teacher_dim(tiny_teacher, tmp_path):
    other = build_tiny_bert(tmp_path / "other", hidden=24, layers=1, heads=2, seed=1)
    cfg = StudentConfig(kind="pretrained", model=str(other), max_length=64, projection_init="random")
    student = build_student(cfg, tiny_teacher_config(tiny_teacher), TEACHER_DIM)
    assert student[2].linear.weight.shape == (TEACHER_DIM, 24)
    assert forward_texts(student, ["gene"], ["document"]).shape == (1, TEACHER_DIM)


def test_config_errors_name_the_field(tiny_teacher):
    teacher = tiny_teacher_config(tiny_teacher)
    with pytest.raises(StudentError, match="student.layers"):
        build_student(StudentConfig(kind="teacher_layers", layers=[0, 9], projection_init="random"), teacher, 32)
    with pytest.raises(StudentError, match="student.hidden_size"):
        build_student(StudentConfig(kind="fresh", hidden_size=30, num_heads=4, projection_init="random"), teacher, 32)
    with pytest.raises(StudentError, match="student.projection_init"):
        build_student(StudentConfig(kind="teacher_layers", layers=[0]), teacher, 32)


def test_lstsq_head_starts_closer_than_random(tiny_teacher, sample):
    fit, held_out = sample
    losses = {}
    for init in ("random", "lstsq"):
        cfg = StudentConfig(kind="teacher_layers", layers=[1], max_length=64, projection_init=init)
        student = build_student(cfg, tiny_teacher_config(tiny_teacher), TEACHER_DIM, sample=fit)
        losses[init] = evaluate(student, held_out)["val_loss"]
    assert losses["lstsq"] < 0.5 * losses["random"]


def test_unused_pooler_is_frozen(tiny_teacher):
    cfg = StudentConfig(kind="teacher_layers", layers=[0], max_length=64, projection_init="random")
    student = build_student(cfg, tiny_teacher_config(tiny_teacher), TEACHER_DIM)
    frozen = freeze_unused_parameters(student)
    assert frozen and all("pooler" in name for name in frozen)
    assert all(p.requires_grad for name, p in student.named_parameters() if name not in frozen)


LOAD_WITHOUT_LEAF_RAY = """
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
path, texts = sys.argv[1], json.loads(sys.argv[2])
model = SentenceTransformer(path, device="cpu", local_files_only=True, model_kwargs={"use_safetensors": True})
np.save(path + "-q.npy", model.encode(texts, prompt_name="query"))
np.save(path + "-d.npy", model.encode_document(texts))
assert not any(name.startswith("leaf_ray") for name in sys.modules), "leaf_ray was imported"
"""


@pytest.mark.e2e
def test_export_round_trip_without_leaf_ray(tiny_teacher, sample, tmp_path):
    cfg = StudentConfig(kind="teacher_layers", layers=[0, 3], max_length=64)
    teacher = tiny_teacher_config(tiny_teacher)
    student = build_student(cfg, teacher, TEACHER_DIM, sample=sample[0])
    out = export_student(student, tmp_path / "leaf", student_manifest(cfg, teacher, TEACHER_DIM, 1000))

    files = [p.name for p in out.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "model.safetensors" in files and MANIFEST_NAME in files
    manifest = read_manifest(out)
    assert manifest["teacher"]["model"] == str(tiny_teacher) and manifest["prompts"] == TEACHER_PROMPTS
    assert manifest["param_counts"]["total"] == count_parameters(student).total
    assert manifest["param_counts"]["ratio"] == pytest.approx(1000 / count_parameters(student).total)
    assert manifest["student"]["layers"] == [0, 3] and manifest["results"] == {}
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"] == TEACHER_PROMPTS
    assert update_manifest(out, results={"ndcg": 0.5})["results"] == read_manifest(out)["results"] == {"ndcg": 0.5}

    texts = ["protein expression in mouse cells", "risk of treatment", "the"]
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LEAF_RAY, str(out), json.dumps(texts)], check=True,
                   cwd=tmp_path)
    student.eval()
    with torch.no_grad():
        for suffix, kind in (("q", "query"), ("d", "document")):
            expected = forward_texts(student, texts, [kind] * 3).numpy()
            loaded = np.load(f"{out}-{suffix}.npy")
            cos = (expected * loaded).sum(-1) / np.linalg.norm(expected, axis=-1) / np.linalg.norm(loaded, axis=-1)
            assert cos.min() > 0.9999
