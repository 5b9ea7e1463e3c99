"""LEAF training on Ray Train (V2): DDP workers read shards of (text, teacher vector) rows and pull the
student's normalised vector onto the teacher's.

A run lives in `<storage.runs_root>/<name>/` (Ray Train's storage_path is `runs_root`, its run name `name`):

    init_student/    the student before training, built once (its manifest pins the student config)
    checkpoint_*/    Ray Train checkpoints: a loadable student + optimizer.pt, scheduler.pt, train_state.json
    metrics.jsonl    rank 0's progress log (start, every `train.log_every_steps`, epochs, end)
    student/         the exported final student (sentence-transformers directory + leaf_manifest.json)

Resume: rerunning with the same runs_root and name continues from the run's latest checkpoint (Ray Train
restores its checkpoint manager from that folder and hands the checkpoint to `ray.train.get_checkpoint()`).
Exact on resume: model weights, AdamW moments, the LR scheduler's position, global step, epoch, and the
count of samples seen. Approximate: the position in the data. The resumed epoch skips as many batches per
worker as were trained in that epoch, but which rows those were depends on Ray Data's dynamic split across
workers and on the local shuffle, so a few rows of that epoch may be seen twice or not at all (in stream
mode the skipped rows are embedded by the teacher again). Dropout randomness restarts from the seed. Raising
`train.max_steps` on resume recomputes the rest of the LR schedule over the new total.

On a multi-node cluster `storage.runs_root` must be shared storage (as Ray Train needs for checkpoints):
workers read `init_student/` from it and rank 0 writes `metrics.jsonl` there. It may be an object store
(s3://, gs://: leaf_ray.storage): Ray Train then keeps its checkpoints in the bucket, the students are
exported to the run's local working copy (leaf_ray.runs.RunFolder) and uploaded, and workers download
`init_student/` to a temporary directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.modules import Dense

from leaf_ray.config import RunConfig, TrainConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.inputs import TrainingInputs
from leaf_ray.progress import quiet_library_bars
from leaf_ray.runs import RunFolder
from leaf_ray.storage import StoragePath, local_copy
from leaf_ray.student import (MANIFEST_NAME, TeacherRows, build_student, export_student, forward_texts,
                              freeze_unused_parameters, load_flags, load_student, student_manifest,
                              teacher_parameter_count)
from leaf_ray.tracking import RunMetrics

class TrainError(LeafRayError, ValueError):
    """A training setup that cannot work; the message names the config field."""


# -- the objective and the optimiser -------------------------------------------------------------------

def leaf_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Distance between normalised student and teacher vectors, averaged over the batch.

    `l2` (the paper's): squared L2 norm of the difference, = 2 - 2 cos. `mse`: the same divided by the
    dimension (torch's MSE). `cosine`: 1 - cos.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    if kind == "l2":
        return (s - t).pow(2).sum(-1).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1 - (s * t).sum(-1)).mean()
    raise TrainError(f"train.loss {kind!r} is not one of l2, mse, cosine")


def lr_factor(step: int, total: int, warmup: int, schedule: str, cycles: int = 1, floor: float = 0.0) -> float:
    """LR multiplier at `step`: linear warmup, then constant, linear decay to `floor` at `total`, or
    `cyclic_linear` (the paper's): the post-warmup steps split into `cycles` linear decays to `floor`, each
    restarting at the peak."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "cyclic_linear":
        progress = (progress * cycles) % 1.0
    return floor + (1.0 - floor) * max(0.0, 1.0 - progress)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters in four groups: the encoder's and the projection head's (at
    `train.head_lr`, default `train.lr`), each split into matrices with weight decay and 1-d parameters (biases,
    norm weights) without. The groups' `part` names what each is, for make_scheduler."""
    head = {id(p) for module in model if isinstance(module, Dense) for p in module.parameters()}
    groups = []
    for part, lr in (("encoder", cfg.lr), ("head", cfg.head_lr or cfg.lr)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == (part == "head")]
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr": lr,
                    "part": part},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr, "part": part}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over all steps for the head; the encoder holds still (lr 0) for `train.head_only_steps` and
    then runs the same schedule over the steps left, warmup included."""
    curve = dict(total=total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule, cycles=cfg.cycles,
                 floor=cfg.min_lr_ratio)
    factors = {"head": partial(held_lr_factor, hold=0, **curve),
               "encoder": partial(held_lr_factor, hold=cfg.head_only_steps, **curve)}
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factors[group["part"]] for group in optimizer.param_groups])


def held_lr_factor(step: int, hold: int, total: int, **curve) -> float:
    """lr_factor started `hold` steps late (0 until then); hold 0 is lr_factor itself."""
    return 0.0 if step < hold else lr_factor(step - hold, max(total - hold, 1), **curve)


def worker_threads(cfg: TrainConfig) -> int:
    """Torch intra-op threads per worker: `train.torch_threads`, else the worker's CPUs rounded up."""
    return cfg.torch_threads or max(1, math.ceil(cfg.cpus_per_worker))


def train_step(model, forward, batch: TeacherRows, optimizer, scheduler, cfg: TrainConfig,
               device: torch.device) -> float:
    """One optimiser step on a batch; `forward` is the model or its DDP wrapper. Returns the loss."""
    teacher = torch.tensor(batch.vectors, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        student = forward_by_length(model, batch.texts, batch.kinds, forward, cfg.padding_buckets)
    loss = leaf_loss(student, teacher, cfg.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def forward_by_length(model, texts: list[str], kinds: list[str], forward, buckets: int) -> torch.Tensor:
    """The batch's student vectors, in batch order, computed as up to `buckets` length-sorted sub-batches each
    padded to its own longest text.

    The loss and its gradient are those of the whole batch (the vectors are joined before the loss), so a random
    batch of queries and documents keeps its mixed gradient while its queries stop paying for the documents'
    padding. DDP sees one forward through its wrapper per step; the other sub-batches run the bare module, whose
    parameters' gradients the one backward still reduces.
    """
    if buckets <= 1 or len(texts) <= 1:
        return forward_texts(model, texts, kinds, forward)
    parts = length_buckets([len(t) for t in texts], buckets)
    vectors = [forward_texts(model, [texts[i] for i in part], [kinds[i] for i in part], forward if n == 0 else model)
               for n, part in enumerate(parts)]
    inverse = torch.from_numpy(np.argsort(np.concatenate(parts), kind="stable")).to(vectors[0].device)
    return torch.cat(vectors)[inverse]


def length_buckets(lengths, buckets: int) -> list[np.ndarray]:
    """Row indices split into at most `buckets` runs of the length-sorted rows, chosen to minimise the padded
    size (rows x longest length, summed over runs) by dynamic programming over the cut points."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    longest = np.asarray(lengths, dtype=np.float64)[order]  # a run ending at row j pads to longest[j]
    n, k = len(order), min(buckets, len(order))
    cost = np.full((k + 1, n + 1), np.inf)
    cut = np.zeros((k + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    starts = np.arange(n)
    for runs in range(1, k + 1):
        for end in range(1, n + 1):
            options = cost[runs - 1, :end] + (end - starts[:end]) * longest[end - 1]
            cut[runs, end] = int(np.argmin(options))
            cost[runs, end] = options[cut[runs, end]]
    runs, end, parts = int(np.argmin(cost[1:, n])) + 1, n, []
    while end > 0:
        parts.append(order[cut[runs, end]:end])
        end, runs = cut[runs, end], runs - 1
    return parts[::-1]


@torch.no_grad()
def evaluate(model, rows: TeacherRows, loss: str = "l2", batch_size: int = 64, rank: int = 0,
             world: int = 1) -> dict:
    """Mean loss and cosine(student, teacher) over `rows`; each rank takes every `world`-th row and the
    sums are all-reduced, so the figures are exact for any worker count."""
    if len(rows) == 0:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = rows.slice(rank, None, world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, cosine sum, n
    for start in range(0, len(mine), batch_size):
        part = mine.slice(start, start + batch_size)
        student = forward_texts(model, part.texts, part.kinds).float()
        teacher = torch.tensor(part.vectors, device=device)
        cos = F.cosine_similarity(student, teacher.float(), dim=-1)
        sums += torch.stack([leaf_loss(student, teacher, loss) * len(part), cos.sum(),
                             torch.tensor(float(len(part)), device=device)]).double()
    _all_reduce(sums, world)
    model.train(was_training)
    return {"val_loss": (sums[0] / sums[2]).item(), "val_cosine": (sums[1] / sums[2]).item()}


def _all_reduce(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def state_digest(model: torch.nn.Module) -> str:
    """A hash of every weight: equal digests mean bit-identical models (used to verify resumes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -- checkpoints ------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken (global: all workers step together)
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches per worker trained in the current epoch
    samples: int = 0  # rows trained on, all workers


def save_checkpoint(directory: Path, model, optimizer, scheduler, state: TrainState) -> None:
    """A checkpoint is a loadable student directory plus the optimiser, scheduler and counters. The two
    torch files hold tensors and numbers only and are read back with `weights_only=True`."""
    model.save(str(directory), safe_serialization=True, create_model_card=False)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    (directory / "train_state.json").write_text(json.dumps(asdict(state)))


def _restore(directory: Path, device: torch.device, trust_remote_code: bool = False):
    """(model, optimizer state, scheduler state, TrainState) from a checkpoint directory."""
    model = load_student(directory, trust_remote_code=trust_remote_code)
    optimizer = torch.load(directory / "optimizer.pt", map_location=device, weights_only=True)
    scheduler = torch.load(directory / "scheduler.pt", weights_only=True)
    state = TrainState(**json.loads((directory / "train_state.json").read_text()))
    return model, optimizer, scheduler, state


# -- the per-worker loop ------------------------------------------------------------------------------------

class _Clock:
    """Wall time spent training (data waits included), with validation and checkpoints paused out."""

    def __init__(self):
        self.started, self.paused_s = time.perf_counter(), 0.0

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - t0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused_s


class _Worker:
    """One DDP rank: its student, optimiser and counters, and the steps of the training loop."""

    def __init__(self, config: dict):
        import ray
        import ray.train
        import ray.train.torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per load would flood the driver's log
        run = RunConfig.model_validate(config["cfg"])
        self.cfg, trust = run.train, load_flags(run.student, run.teacher)[0]
        self.total, self.trace = config["total_steps"], config["trace_ids"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(worker_threads(self.cfg))
        torch.manual_seed(self.cfg.seed + self.rank)
        self.device = ray.train.torch.get_device()
        self.history = config["history"] if self.rank == 0 else None
        self.tracked = RunMetrics(config["tracking"]) if self.history is not None and config["tracking"] else None
        self.val = ray.get(config["val"])

        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as directory:
                self.model, opt_state, sched_state, self.state = _restore(Path(directory), self.device, trust)
        else:
            with local_copy(config["init_dir"]) as directory:
                self.model = load_student(directory, trust_remote_code=trust)
            opt_state, sched_state = None, None
            self.state = TrainState()
        self.start = {"event": "start", "step": self.state.step, "epoch": self.state.epoch,
                      "resumed": checkpoint is not None, "weights_digest": state_digest(self.model),
                      "world_size": self.world}
        freeze_unused_parameters(self.model)
        self.model.to(self.device).train()  # dropout on (loaded encoders come in eval mode); validation turns it off
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, self.cfg, self.total)
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
            self.scheduler.load_state_dict(sched_state)
        self.forward = ray.train.torch.prepare_model(self.model, move_to_device=False)
        self.first_step, self.last_checkpoint = self.state.step, self.state.step if checkpoint else -1
        self.window, self.seen = [], []

    def log(self, record: dict) -> None:
        """Rank 0 appends `record` to metrics.jsonl and, with tracking on, logs it to the run's MLflow run."""
        record = _log(self.history, record)
        if self.tracked is not None:
            self.tracked.log(record)

    def validate(self) -> dict:
        return evaluate(self.model, self.val, self.cfg.loss, rank=self.rank, world=self.world)

    def samples_per_s(self) -> float:
        return (self.state.step - self.first_step) * self.cfg.batch_size * self.world / max(self.clock.seconds, 1e-9)

    def report(self, metrics: dict, checkpoint: bool = False) -> None:
        """Every rank reports (Ray Train's barrier); rank 0 also logs and, if asked, saves the checkpoint."""
        import ray.train

        with self.clock.paused():
            metrics = {**metrics, "step": self.state.step, "epoch": self.state.epoch, "samples": self.state.samples}
            self.log(metrics)
            if checkpoint:
                self.last_checkpoint = self.state.step
            if checkpoint and self.rank == 0:
                with tempfile.TemporaryDirectory(prefix="leaf-ckpt-") as directory:
                    save_checkpoint(Path(directory), self.model, self.optimizer, self.scheduler, self.state)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(metrics)

    def batches(self, shard):
        """This rank's batches of the current epoch (with their ids), skipping those a resumed run trained."""
        cfg, shuffle, group = self.cfg, self.cfg.shuffle_buffer_rows, self.cfg.length_group_batches
        seed = cfg.seed * 100_003 + self.state.epoch * 1_009 + self.rank
        batches = shard.iter_batches(
            batch_size=cfg.batch_size * max(group, 1), batch_format="numpy", drop_last=group <= 1,
            local_shuffle_buffer_size=shuffle or None, local_shuffle_seed=seed if shuffle else None)
        if group > 1:
            batches = length_grouped_batches(batches, cfg.batch_size, seed)
        for index, batch in enumerate(batches):
            if index >= self.state.batch_in_epoch:
                yield TeacherRows.of(batch), [str(i) for i in batch["id"]]

    def run_epoch(self, shard) -> bool:
        """Train through the epoch; False if the step budget ran out first."""
        cfg, state = self.cfg, self.state
        for batch, ids in self.batches(shard):
            if state.step >= self.total:
                return False
            self.window.append(train_step(self.model, self.forward, batch, self.optimizer, self.scheduler, cfg,
                                          self.device))
            if self.trace:
                self.seen.extend(ids)
            state.step, state.batch_in_epoch, state.samples = (state.step + 1, state.batch_in_epoch + 1,
                                                               state.samples + len(ids) * self.world)
            if state.step % cfg.log_every_steps == 0:
                loss = _all_reduce(torch.tensor([float(np.mean(self.window))], device=self.device), self.world)
                self.window = []
                self.report({"event": "log", "loss": loss.item() / self.world, "lr": self.scheduler.get_last_lr()[0],
                             "samples_per_s": self.samples_per_s()})
            if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                self.report({"event": "checkpoint"}, checkpoint=True)
            if cfg.validate_every_steps and state.step % cfg.validate_every_steps == 0:
                self.report({"event": "validate", **self.validate()})
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self.report({"event": "epoch", **self.validate()}, checkpoint=True)
        return True

    def run(self) -> dict:
        import ray.train

        self.log({**self.start, **self.validate()})
        self.clock = _Clock()
        shard = ray.train.get_dataset_shard("train")
        while self.state.step < self.total and self.state.epoch < self.cfg.epochs and self.run_epoch(shard):
            pass
        final = {"event": "end", "samples_per_s": self.samples_per_s(),
                 "steps_this_run": self.state.step - self.first_step, **self.validate()}
        self.report(final, checkpoint=self.state.step != self.last_checkpoint)
        return {"start": self.start, "final": {**final, **asdict(self.state)},
                "ids_by_rank": _gather(self.seen, self.world) if self.trace else None}


def _worker_loop(config: dict) -> dict:
    """Ray Train's per-worker entry point; returns rank 0's summary as the Result's return_value."""
    quiet_library_bars()
    return _Worker(config).run()


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _log(history: StoragePath | None, record: dict) -> dict:
    """Rank 0 appends the record, stamped with the time, to metrics.jsonl (on an object store: rewrites the small
    object) and prints a progress line; returns the stamped record."""
    if history is None:
        return record
    record = {"time": round(time.time(), 3), **record}
    history.append_text(json.dumps(record) + "\n")
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                     if k not in ("time", "weights_digest"))
    # Written, not printed: Ray Train patches print in its workers to log the line as well, and under a job's
    # logging setup the line then reached the log twice.
    sys.stdout.write(f"[leaf train] {shown}\n")
    sys.stdout.flush()
    return record


# -- the driver -----------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: Path  # the run's local working copy (the run folder itself when storage.runs_root is local)
    student_path: Path  # the exported final student (in run_dir; also uploaded when runs_root is remote)
    checkpoint_path: str | None  # the latest Ray Train checkpoint (a URI when runs_root is an object store)
    history_path: Path  # metrics.jsonl (a local copy when runs_root is remote)
    steps: int
    samples_per_s: float  # this call's training throughput, all workers
    metrics: dict = field(default_factory=dict)  # final validation metrics and counters
    start: dict = field(default_factory=dict)  # where this call started (resumed step, weights digest)
    ids_by_rank: list | None = None  # with trace_ids: the row ids each worker trained on

    def history(self) -> list[dict]:
        return [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]


def length_grouped_batches(pools, batch_size: int, seed: int):
    """Re-cut pools of shuffled rows (numpy column dicts) into batches of similar text length, in a seeded
    random order.

    A batch is padded to its longest text: on a query/document mix almost every random batch of 32 holds a
    document at max_length next to queries of ten tokens, so most of a step's compute is padding. Sorting
    each pool by length before cutting keeps batch content random but batch length tight (Hugging Face's
    `group_by_length` idea). Rows left over at a pool's end join the next pool; the final remainder is
    dropped like `drop_last`, so each DDP rank gets floor(rows / batch_size) batches, as before.
    """
    rng, carry = np.random.default_rng(seed), None
    for pool in pools:
        if carry is not None:
            pool = {name: np.concatenate([carry[name], column]) for name, column in pool.items()}
        order = np.argsort(np.fromiter((len(t) for t in pool["text"]), dtype=np.int64, count=len(pool["text"])),
                           kind="stable")
        full = len(order) // batch_size * batch_size
        for start in rng.permutation(np.arange(0, full, batch_size)):
            yield {name: column[order[start:start + batch_size]] for name, column in pool.items()}
        carry = {name: column[order[full:]] for name, column in pool.items()}


def total_steps(cfg: TrainConfig, train_rows: int) -> int:
    """Optimiser steps of the whole run: every worker drops its last partial batch of each epoch."""
    per_epoch = train_rows // cfg.num_workers // cfg.batch_size
    if per_epoch == 0:
        raise TrainError(f"train.batch_size ({cfg.batch_size}) x train.num_workers ({cfg.num_workers}) exceeds "
                         f"the {train_rows} training rows")
    return min(cfg.epochs * per_epoch, cfg.max_steps or cfg.epochs * per_epoch)


def projection_sample(train, size: int) -> TeacherRows:
    """Rows for the lstsq head: the first rows of the training dataset, a random sample of the mix (cache parts
    are random samples in random row order; an in-memory table is shuffled)."""
    return TeacherRows.of(train.take_batch(size, batch_format="numpy"))


def prepare_initial_student(cfg: RunConfig, teacher_dim: int, train) -> StoragePath:
    """Build the untrained student once per run into `<run>/init_student` (reused on resume; refused if
    the run was started with another student or teacher); returns where it is stored."""
    run = RunFolder(cfg)
    path = run.location / "init_student"
    if (path / MANIFEST_NAME).is_file():
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        stored = (manifest["student"], manifest["teacher"]["model"], manifest["teacher"]["dim"])
        if stored != (cfg.student.model_dump(), cfg.teacher.model, teacher_dim):
            raise TrainError(f"run {cfg.name!r} at {run.location} was started with another student/teacher "
                             f"(student {stored[0]}, teacher {stored[1]}, dim {stored[2]}); pick a new `name` "
                             "or delete that folder")
        return path
    sample = (projection_sample(train, cfg.student.projection_init_samples)
              if cfg.student.projection_init == "lstsq" else None)
    models = cfg.model_store()
    model = build_student(cfg.student, cfg.teacher, teacher_dim, sample=sample, models=models, seed=cfg.train.seed)
    params = teacher_parameter_count(cfg.teacher, models)
    export_student(model, run.path / "init_student", {**student_manifest(cfg.student, cfg.teacher, teacher_dim,
                                                                         params), "run": cfg.name})
    run.publish("init_student")
    return path


def make_trainer(cfg: RunConfig, train_ds, loop_config: dict, callbacks=()):
    """A TorchTrainer: DDP over gloo (CPU) or NCCL (GPU), one shard of `train_ds` per worker. `callbacks`: Ray
    Train UserCallbacks (a sweep passes Tune's TuneReportCallback)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    use_gpu = tc.gpus_per_worker > 0
    # Blocks reach the workers in the dataset's own (seeded) order rather than as read tasks finish, so the
    # same config trains on the same batches however its tasks are scheduled.
    ingest = copy.deepcopy(ray.data.DataContext.get_current().execution_options)  # Train's ingest defaults
    ingest.preserve_order = True
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if use_gpu else {}),
                 **tc.resources_per_worker}
    return TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources, accelerator_type=tc.accelerator_type),
        run_config=ray.train.RunConfig(
            name=cfg.name, **cfg.storage.runs_location().ray_storage(),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=list(callbacks)),
        datasets={"train": train_ds},
        dataset_config=ray.train.DataConfig(execution_options={"train": ingest}),
    )


def train_student(cfg: RunConfig, inputs: TrainingInputs, *, trace_ids: bool = False, callbacks=(),
                  tracking: dict | None = None) -> TrainResult:
    """Train (or resume) the run `cfg.name` on `inputs` (leaf_ray.inputs) and export its final student.

    The workers read `inputs.train` as Ray Train dataset shards, in its own order; `inputs.val` is evaluated at
    start, every epoch and end.
    trace_ids: return the ids each worker trained on (audits, tests).
    callbacks: Ray Train UserCallbacks for the trainer (make_trainer).
    tracking: the MLflow run rank 0 logs metrics.jsonl's records to (leaf_ray.tracking.TrackedRun.target).
    """
    import ray

    run = RunFolder(cfg)
    run_dir = run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    init_dir = prepare_initial_student(cfg, inputs.teacher_dim, inputs.train)
    steps = total_steps(cfg.train, inputs.train_rows)
    loop_config = {"cfg": cfg.model_dump(), "init_dir": init_dir, "total_steps": steps,
                   "val": ray.put(TeacherRows.of(inputs.val)), "history": run.location / "metrics.jsonl",
                   "trace_ids": trace_ids, "tracking": tracking}
    result = make_trainer(cfg, inputs.train, loop_config, callbacks).fit()
    summary = result.return_value
    with result.checkpoint.as_directory() as directory:
        manifest = json.loads((init_dir / MANIFEST_NAME).read_text())
        manifest.update(run=cfg.name, train=cfg.train.model_dump(), results={"train": summary["final"]})
        final = load_student(directory, trust_remote_code=load_flags(cfg.student, cfg.teacher)[0])
        student_path = export_student(final, run_dir / "student", manifest)
    run.publish("student")
    run.fetch("metrics.jsonl")
    checkpoint = str(run.location.at(result.checkpoint.path).native())
    return TrainResult(run_dir=run_dir, student_path=student_path, checkpoint_path=checkpoint,
                       history_path=run_dir / "metrics.jsonl", steps=summary["final"]["step"],
                       samples_per_s=summary["final"]["samples_per_s"], metrics=summary["final"],
                       start=summary["start"], ids_by_rank=summary["ids_by_rank"])
