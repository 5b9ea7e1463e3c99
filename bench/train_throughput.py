"""Student training throughput: a plain single-process PyTorch loop vs Ray Train with 1 and 2 DDP workers,
on the same cached teacher vectors, student, batch size per process and torch threads, in one run.

    python bench/train_throughput.py [--texts 2048] [--steps 30] [--threads 1] [--batch-size 32] [--rounds 3]

Steady state = rows trained between the first and the last progress record / the time between them
(model load, Ray start-up and the first `log_every` steps excluded); "with start-up" = all rows trained / the
whole call's wall time. Every process trains `--batch-size` rows per step, so 2 workers train 2x the rows per
step. The plain loop runs the same `train_step` as the Ray workers. The three runs alternate for `--rounds`
rounds (forward, then reversed); the table shows each run's median and the median per-round ratio to the plain
loop, steady and with start-up.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import torch

from leaf_ray.bench import alternating, median_ratios
from leaf_ray.config import DataConfig, DataSource, RunConfig, StorageConfig, StudentConfig, TeacherConfig, TrainConfig
from leaf_ray.data import build_mix
from leaf_ray.inputs import TrainingInputs, split_table
from leaf_ray.models import MINILM_ID
from leaf_ray.student import TeacherRows, build_student, freeze_unused_parameters
from leaf_ray.train import (length_grouped_batches, make_optimizer, make_scheduler, train_step,
                            train_student, worker_threads)

RESULTS = Path(__file__).resolve().parent / "results"
LOG_EVERY = 5
GROUP = TrainConfig().length_group_batches  # the plain loop cuts batches the way Ray workers do


def run_config(args, name: str, workers: int, work: Path) -> RunConfig:
    return RunConfig(
        name=name,
        data=DataConfig(sources=[DataSource(path="train-text/texts.jsonl.gz", limit=args.texts)], validation_size=64),
        teacher=TeacherConfig(model=MINILM_ID, max_length=args.max_length, torch_threads=2),
        student=StudentConfig(kind="teacher_layers", layers=[0, 2, 4], max_length=args.max_length,
                              projection_init="random"),
        train=TrainConfig(batch_size=args.batch_size, max_steps=args.steps, epochs=100, num_workers=workers,
                          cpus_per_worker=0.5, torch_threads=args.threads,
                          log_every_steps=LOG_EVERY, warmup_steps=0),
        storage=StorageConfig(cache_root=str(Path(".leaf_cache").resolve()), runs_root=str(work / "runs")),
    )


def table_pools(table, rows: int):
    """The table as consecutive numpy column dicts of `rows` rows, like Ray Data's iter_batches."""
    for start in range(0, len(table), rows):
        part = table.slice(start, rows)
        yield {name: part.column(name).to_numpy(zero_copy_only=False) for name in ("text", "kind", "embedding")}


def steady_rate(records: list[dict], rows_per_step: int) -> float:
    first, last = records[0], records[-1]
    return (last["step"] - first["step"]) * rows_per_step / (last["time"] - first["time"])


def plain_loop(cfg: RunConfig, train, teacher_dim: int) -> dict:
    """The Ray worker's step, without Ray: one process, the same student, optimiser and batches."""
    started = time.time()
    torch.set_num_threads(worker_threads(cfg.train))
    torch.manual_seed(cfg.train.seed)
    model = build_student(cfg.student, cfg.teacher, teacher_dim, models=cfg.model_store())
    freeze_unused_parameters(model)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, cfg.train.max_steps)
    size, records = cfg.train.batch_size, []
    shuffled = train.take(np.random.default_rng(cfg.train.seed).permutation(len(train)))
    batches = list(length_grouped_batches(table_pools(shuffled, size * GROUP), size, cfg.train.seed))
    for step in range(1, cfg.train.max_steps + 1):
        batch = TeacherRows.of(batches[(step - 1) % len(batches)])
        train_step(model, model, batch, optimizer, scheduler, cfg.train, torch.device("cpu"))
        if step % LOG_EVERY == 0:
            records.append({"step": step, "time": time.time()})
    wall = time.time() - started
    return {"steady_samples_per_s": steady_rate(records, size), "wall_s": wall,
            "with_startup_samples_per_s": cfg.train.max_steps * size / wall}


def ray_run(cfg: RunConfig, train, val, teacher_dim: int) -> dict:
    started = time.time()
    result = train_student(cfg, TrainingInputs.in_memory(train, val, teacher_dim, cfg.train.seed))
    logs = [r for r in result.history() if r["event"] == "log"]
    wall, rows_per_step = time.time() - started, cfg.train.batch_size * cfg.train.num_workers
    return {"steady_samples_per_s": steady_rate(logs, rows_per_step), "wall_s": wall,
            "with_startup_samples_per_s": cfg.train.max_steps * rows_per_step / wall,
            "worker_samples_per_s": result.samples_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (each worker too)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step per process")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from leaf_ray.runtime import init_ray
    from leaf_ray.teacher import build_cache

    work = Path(tempfile.mkdtemp(prefix="leaf-train-bench-"))
    base = run_config(args, "plain", 1, work)
    init_ray(base.ray.model_copy(update={"num_cpus": os.cpu_count()}))
    ray.data.DataContext.get_current().enable_progress_bars = False
    texts, _ = build_mix(base.data)
    cache = build_cache(texts, base.teacher, base.storage.cache_path())
    train, val = split_table(cache.read_table(), base.data.validation_size, base.data.seed)
    load_before = os.getloadavg()

    setups = {"plain loop": 0, "ray train, 1 worker": 1, "ray train, 2 workers": 2}  # name: Ray workers
    rounds = {name: [] for name in setups}
    for index in range(args.rounds):
        for name in alternating(list(setups), index):
            workers = setups[name]
            row = (ray_run(run_config(args, f"bench-{workers}w-r{index}", workers, work), train, val, cache.dim)
                   if workers else plain_loop(base, train, cache.dim))
            rounds[name].append(row | {"loadavg_1m_after": os.getloadavg()[0]})
    results = {name: {key: float(np.median([r[key] for r in rows])) for key in rows[0]} | {"rounds": rows}
               for name, rows in rounds.items()}
    vs_plain = {key: median_ratios(rounds, "plain loop", key)
                for key in ("steady_samples_per_s", "with_startup_samples_per_s")}
    report = {
        "setup": {"rounds": args.rounds, "teacher": MINILM_ID,
                  "student": "teacher_layers [0, 2, 4] (3 of 6 MiniLM layers)",
                  "train_rows": len(train), "steps": args.steps, "batch_size_per_process": args.batch_size,
                  "torch_threads_per_process": args.threads, "max_length": args.max_length,
                  "length_group_batches": GROUP},
        "results": results,
        "vs_plain_loop": vs_plain,  # medians of per-round ratios
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'run (median of ' + str(args.rounds) + ')':<22}{'steady samples/s':>18}{'wall s':>10}"
          f"{'steady / plain':>16}{'with start-up / plain':>23}")
    for name, row in results.items():
        print(f"{name:<22}{row['steady_samples_per_s']:>18.1f}{row['wall_s']:>10.1f}"
              f"{vs_plain['steady_samples_per_s'][name]:>16.3f}{vs_plain['with_startup_samples_per_s'][name]:>23.3f}")
    print(f"(load average before/after: {load_before} / {os.getloadavg()}; saved {RESULTS / 'train_throughput.json'})")


if __name__ == "__main__":
    main()
