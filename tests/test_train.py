"""LEAF training on real local Ray Train: DDP over 2 CPU workers, checkpoints, resume, export, streaming."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leaf_ray.config import RunConfig, StorageConfig, StudentConfig, TrainConfig
from leaf_ray.inputs import TrainingInputs, split_table
from leaf_ray.student import build_student, load_student, read_manifest
from leaf_ray.train import (TrainError, forward_by_length, leaf_loss, length_buckets, length_grouped_batches, lr_factor,
                            make_optimizer, make_scheduler, state_digest, total_steps, train_student)

from .conftest import random_texts, tiny_teacher_config
from .ray_tasks import held_back


def make_config(tmp_path: Path, teacher_dir: Path, name: str, **train) -> RunConfig:
    train = {"batch_size": 16, "lr": 1e-3, "epochs": 2, "num_workers": 2, "cpus_per_worker": 0.5,
             "torch_threads": 1, "log_every_steps": 5, "shuffle_buffer_rows": 64, "schedule": "constant",
             "warmup_steps": 10, "padding_buckets": 2, **train}  # two forwards per step under DDP
    return RunConfig(
        name=name,
        teacher=tiny_teacher_config(teacher_dir, num_cpus_per_actor=0.5),
        student=StudentConfig(kind="teacher_layers", layers=[0, 2], max_length=64, projection_init="random"),
        train=TrainConfig(**train),
        storage=StorageConfig(cache_root=str(tmp_path / "cache"), runs_root=str(tmp_path / "runs")),
    )


def split(rows, size: int = 48):
    return split_table(rows, size, seed=0)


def steps_of(rows: int, epochs: int = 2) -> int:
    return epochs * (rows // 2 // 16)  # 2 workers of 16 rows


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint"))


# -- pure functions ----------------------------------------------------------------------------------------

def test_losses_agree_on_unit_vectors():
    s, t = torch.nn.functional.normalize(torch.randn(8, 5), dim=-1), torch.nn.functional.normalize(torch.randn(8, 5), dim=-1)
    cos = (s * t).sum(-1)
    assert leaf_loss(s, t, "l2").item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    assert leaf_loss(s, t, "mse").item() == pytest.approx(leaf_loss(s, t, "l2").item() / 5, rel=1e-5)
    assert leaf_loss(s, t, "cosine").item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    assert leaf_loss(3 * t, t, "l2").item() == pytest.approx(0.0, abs=1e-6)  # scale-free: vectors are normalised


def test_schedules():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0
    cyclic = [lr_factor(s, 8, 0, "cyclic_linear", cycles=2) for s in range(8)]
    assert cyclic == pytest.approx([1, 0.75, 0.5, 0.25, 1, 0.75, 0.5, 0.25])
    # the paper's cycles: each decays 1e-4 -> 1e-5 (a floor of 0.1), restarting at the peak
    paper = [lr_factor(s, 30, 0, "cyclic_linear", cycles=3, floor=0.1) for s in range(30)]
    assert paper[0] == paper[10] == paper[20] == 1.0 and paper[9] == paper[19] == paper[29] == pytest.approx(0.19)
    assert min(paper) > 0.1 and lr_factor(10, 10, 0, "linear", floor=0.1) == pytest.approx(0.1)


def test_the_head_has_its_own_lr_and_can_train_alone_first(tiny_teacher):
    student = StudentConfig(kind="teacher_layers", layers=[0], max_length=64, projection_init="random")
    model = build_student(student, tiny_teacher_config(tiny_teacher), 48)
    cfg = TrainConfig(lr=1e-4, head_lr=1e-3, head_only_steps=3, warmup_steps=2, schedule="linear", weight_decay=0.1)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=10)
    head = {id(p) for p in model[2].parameters()}  # the Dense projection
    grouped = [(id(p), group["part"]) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(i for i, _ in grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all((part == "head") == (i in head) for i, part in grouped) and len(head) == 2
    encoder = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    lrs = {"encoder": [], "head": []}
    for step in range(10):
        for group in optimizer.param_groups[::2]:  # one group of each part's pair
            lrs[group["part"]].append(group["lr"])
        before = [p.detach().clone() for p in encoder]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
        moved = any(not torch.equal(a, p) for a, p in zip(before, encoder))
        assert moved == (step >= 3), step  # weight decay included: lr 0 leaves the encoder as it is
    assert lrs["head"][:4] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * 7 / 8])  # warmup, then decay over 10 steps
    assert lrs["encoder"][:7] == pytest.approx([0, 0, 0, 5e-5, 1e-4, 1e-4, 8e-5])  # held, then the same over 7


def test_length_buckets_pad_least_and_keep_every_row_once():
    import itertools

    rng = np.random.default_rng(0)
    for trial in range(20):
        lengths = rng.integers(1, 300, rng.integers(1, 11))
        buckets = int(rng.integers(1, 5))
        parts = length_buckets(lengths, buckets)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths))) and len(parts) <= buckets

        def padded(groups):
            return sum(len(g) * max(g) for g in groups if len(g))
        ordered = sorted(lengths.tolist())
        best = min(padded([ordered[a:b] for a, b in zip((0, *cuts), (*cuts, len(ordered)))])
                   for n in range(min(buckets, len(ordered)))
                   for cuts in itertools.combinations(range(1, len(ordered)), n))
        assert padded([lengths[p].tolist() for p in parts]) == best, trial


def test_a_bucketed_forward_gives_the_whole_batch_its_vectors_and_gradients(tiny_teacher):
    student = StudentConfig(kind="teacher_layers", layers=[0, 1], max_length=64, projection_init="random")
    model = build_student(student, tiny_teacher_config(tiny_teacher), 48).eval()  # no dropout: equal up to rounding
    texts = random_texts(24, seed=3, min_words=1, max_words=40)
    kinds = ["query" if len(t) < 60 else "document" for t in texts]
    target = torch.nn.functional.normalize(torch.randn(24, 48), dim=-1)
    results = []
    for buckets in (1, 4):
        model.zero_grad()
        vectors = forward_by_length(model, texts, kinds, model, buckets)
        leaf_loss(vectors, target).backward()
        results.append((vectors.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (whole, whole_grads), (bucketed, bucketed_grads) = results
    assert torch.allclose(whole, bucketed, atol=1e-5)  # each row back in its place
    assert len(whole_grads) == len(bucketed_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole_grads, bucketed_grads))


def test_total_steps_and_error_names_fields():
    assert total_steps(TrainConfig(batch_size=16, num_workers=2, epochs=3), 100) == 9
    assert total_steps(TrainConfig(batch_size=16, num_workers=2, epochs=3, max_steps=4), 100) == 4
    with pytest.raises(TrainError, match="train.batch_size"):
        total_steps(TrainConfig(batch_size=64, num_workers=2), 100)


# -- Ray Train -----------------------------------------------------------------------------------------------
# One cache-mode run on 2 DDP workers, stopped after 7 steps and resumed to its end, and one stream-mode run
# on the same rows: three Ray Train runs in all, shared by the tests below (each run costs ~15 s of start-up).
# A constant LR after a 10-step warmup makes the two runs' curves comparable and puts the resume point
# inside the warmup, so the logged LR shows whether the scheduler's position was restored.
STOP_AT = 7


@pytest.fixture(scope="module")
def cache_runs(ray_local, tiny_teacher, tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache_runs")
    train, val = split(tiny_cache)
    inputs = TrainingInputs.in_memory(train, val, 32)
    first = train_student(make_config(tmp, tiny_teacher, "ddp", max_steps=STOP_AT), inputs, trace_ids=True)
    stopped = {"state": json.loads((Path(first.checkpoint_path) / "train_state.json").read_text()),
               "digest": state_digest(load_student(first.checkpoint_path))}
    second = train_student(make_config(tmp, tiny_teacher, "ddp"), inputs, trace_ids=True)
    return SimpleNamespace(cfg=make_config(tmp, tiny_teacher, "ddp"), train=train, val=val, first=first,
                           stopped=stopped, second=second, steps=steps_of(len(train)))


@pytest.mark.timeout(480)  # includes the two runs of the fixture
@pytest.mark.e2e
def test_ddp_two_workers_learn_on_disjoint_shards(cache_runs):
    cfg, train, result = cache_runs.cfg, cache_runs.train, cache_runs.second
    history = result.history()
    start, end = history[0], history[-1]
    assert start["event"] == "start" and end["event"] == "end" and start["world_size"] == 2
    assert end["val_loss"] < 0.5 * start["val_loss"] and end["val_cosine"] > start["val_cosine"]
    logged = [r["loss"] for r in history if r["event"] == "log"]
    assert logged[-1] < logged[0]
    assert result.steps == total_steps(cfg.train, len(train)) == cache_runs.steps

    for run in (cache_runs.first, cache_runs.second):
        ids = [set(r) for r in run.ids_by_rank]
        assert len(ids) == 2 and not ids[0] & ids[1]  # disjoint shards
        assert [len(r) for r in run.ids_by_rank] == [run.metrics["steps_this_run"] * 16] * 2  # 16 rows/step/rank
        assert ids[0] | ids[1] <= set(train.column("id").to_pylist())

    # rank 0 wrote the checkpoints; the last one holds the final state and is what was exported
    ckpts = checkpoint_dirs(result.run_dir)
    assert ckpts and len(ckpts) <= cfg.train.keep_checkpoints
    last = Path(result.checkpoint_path)
    assert json.loads((last / "train_state.json").read_text())["step"] == result.steps
    assert state_digest(load_student(last)) == state_digest(load_student(result.student_path))
    manifest = read_manifest(result.student_path)
    assert manifest["results"]["train"]["step"] == result.steps and manifest["teacher"]["dim"] == 32


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_resume_continues_from_checkpoint(cache_runs):
    first, second, steps = cache_runs.first, cache_runs.second, cache_runs.steps
    assert first.steps == STOP_AT and not first.start["resumed"]
    assert cache_runs.stopped["state"] == {"step": STOP_AT, "epoch": 0, "batch_in_epoch": STOP_AT,
                                           "samples": STOP_AT * 32}
    assert second.start["resumed"] and second.start["step"] == STOP_AT
    assert second.start["weights_digest"] == cache_runs.stopped["digest"]  # loaded weights are the checkpoint's
    assert second.steps == steps and second.metrics["steps_this_run"] == steps - STOP_AT
    assert second.metrics["samples"] == steps * 32
    logs = {r["step"]: r for r in second.history() if r["event"] == "log"}
    assert sorted(logs) == list(range(5, steps + 1, 5))  # one log stream across both calls
    assert logs[5]["lr"] == pytest.approx(1e-3 * 6 / 10)  # warmup before the stop ...
    assert logs[10]["lr"] == pytest.approx(1e-3)  # ... completed after it: the scheduler resumed at step 7
    epochs = [r["step"] for r in second.history() if r["event"] == "epoch"]
    assert epochs == [steps // 2, steps]  # the resumed call finished epoch 0 where an uninterrupted run would


@pytest.mark.timeout(120)
def test_a_run_refuses_another_student(ray_local, tiny_teacher, tiny_cache, tmp_path):  # lstsq sample: Ray Data
    from leaf_ray.train import prepare_initial_student

    train, val = split(tiny_cache)
    train = TrainingInputs.in_memory(train, val, 32).train
    cfg = make_config(tmp_path, tiny_teacher, "pinned")
    prepare_initial_student(cfg, 32, train)
    other = cfg.model_copy(update={"student": StudentConfig(kind="teacher_layers", layers=[1], max_length=64,
                                                             projection_init="random")})
    with pytest.raises(TrainError, match="another student"):
        prepare_initial_student(other, 32, train)


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_stream_mode_learns_like_cache_mode(cache_runs, tiny_teacher, tiny_cache, tmp_path):
    """The same rows, split and student as the cache-mode run, with the teacher stage feeding the workers."""
    from leaf_ray.inputs import training_inputs

    cfg = make_config(tmp_path, tiny_teacher, "stream", mode="stream")
    cfg.data.validation_size = 48
    inputs = training_inputs(cfg, tiny_cache.select(["id", "text", "kind"]))
    assert inputs.teacher_dim == 32 and inputs.train_rows == len(cache_runs.train)
    assert sorted(inputs.val.column("id").to_pylist()) == sorted(cache_runs.val.column("id").to_pylist())
    result = train_student(cfg, inputs)

    stream, cache = result.history(), cache_runs.second.history()
    assert stream[0]["val_loss"] == pytest.approx(cache[0]["val_loss"], rel=1e-4)  # same init, same vectors
    assert result.steps == cache_runs.second.steps
    assert stream[-1]["val_loss"] < 0.5 * stream[0]["val_loss"]
    assert stream[-1]["val_loss"] == pytest.approx(cache[-1]["val_loss"], rel=0.3)
    logged = {r["step"]: r["loss"] for r in stream if r["event"] == "log"}
    reference = {r["step"]: r["loss"] for r in cache if r["event"] == "log"}
    assert logged.keys() == reference.keys()
    assert all(logged[s] == pytest.approx(reference[s], rel=0.5) for s in logged)


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_the_same_config_trains_on_the_same_batches_however_its_tasks_finish(ray_local, tiny_teacher, tiny_cache,
                                                                             tmp_path):
    train, val = split(tiny_cache)
    inputs = TrainingInputs.in_memory(train, val, 32, seed=0)
    blocks = inputs.train.repartition(6)  # six map tasks, run side by side
    first_id = train.column("id")[int(np.random.default_rng(0).permutation(len(train))[0])].as_py()  # in_memory's
    order = []
    for name, late_id in (("on-time", None), ("late-first-block", first_id)):
        late = blocks.map_batches(held_back, fn_kwargs={"late_id": late_id}, batch_size=None, num_cpus=0.1)
        cfg = make_config(tmp_path, tiny_teacher, name, num_workers=1, max_steps=6, shuffle_buffer_rows=0)
        result = train_student(cfg, TrainingInputs(late, inputs.val, 32, inputs.train_rows), trace_ids=True)
        order.append(result.ids_by_rank[0])
    assert len(order[0]) == 6 * 16 and order[0] == order[1]  # the late block is waited for, not overtaken


def test_length_grouped_batches_keep_every_row_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 1000)
    texts, ids = np.array(["x" * int(n) for n in lengths], dtype=object), np.arange(1000)
    pools = ({"text": texts[i:i + 128], "id": ids[i:i + 128], "embedding": np.ones((len(ids[i:i + 128]), 3))}
             for i in range(0, 1000, 128))
    batches = list(length_grouped_batches(pools, 32, seed=0))

    assert [len(b["id"]) for b in batches] == [32] * (1000 // 32)  # full batches only, like drop_last
    seen = np.concatenate([b["id"] for b in batches])
    assert len(set(seen.tolist())) == len(seen) == 992
    assert all((texts[b["id"]] == b["text"]).all() for b in batches)  # columns stay row-aligned

    def padded(groups):
        return sum(max(len(t) for t in g) * len(g) for g in groups)
    assert padded([b["text"] for b in batches]) < 0.8 * padded([texts[i:i + 32] for i in range(0, 992, 32)])
    again = list(length_grouped_batches(({k: v[i:i + 128] for k, v in
                                          {"text": texts, "id": ids, "embedding": np.ones((1000, 3))}.items()}
                                         for i in range(0, 1000, 128)), 32, seed=0))
    assert all((a["id"] == b["id"]).all() for a, b in zip(batches, again))  # seeded: resumes cut the same batches
