"""Teacher stage throughput: the Ray Data stage (with its parquet cache writes) vs a plain
single-process sentence-transformers loop on the same texts, model and threads, alternated in one run.

    python bench/teacher_throughput.py [--texts 5000] [--rounds 3] [--threads 2]

Steady state = rows after the first batch (the plain loop) or the first chunk (the stage, by the times its actors
finish each chunk) / the time from it to the last one: model load and pipeline start-up excluded; "with start-up"
= all rows / wall time from the call to the end. The two sides alternate for `--rounds` rounds; each ratio is the
median over rounds of the round's ratio. Writes bench/results/teacher_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from leaf_ray.bench import alternating, median_ratios
from leaf_ray.config import DataConfig, DataSource, TeacherConfig
from leaf_ray.data import build_mix
from leaf_ray.inputs import collect
from leaf_ray.models import MINILM_ID, ModelStore
from leaf_ray.teacher import stage

RESULTS = Path(__file__).resolve().parent / "results"


def plain_loop(texts: list[str], kinds: list[str], cfg: TeacherConfig) -> dict:
    """The baseline a user would write: one process, one model, encode in the stage's batch sizes."""
    start = time.perf_counter()
    torch.set_num_threads(cfg.torch_threads)
    model = ModelStore().load(cfg.model, max_length=cfg.max_length)
    call_rows = cfg.batch_size * stage.FORWARD_BATCHES_PER_CALL
    stamps = []
    for i in range(0, len(texts), call_rows):
        batch, kind = texts[i:i + call_rows], kinds[i:i + call_rows]
        for k in sorted(set(kind)):
            group = [t for t, kk in zip(batch, kind) if kk == k]
            model.encode(group, prompt=cfg.prompt_for(k) or None, batch_size=cfg.batch_size,
                         normalize_embeddings=cfg.normalize)
        stamps.append((time.perf_counter(), len(batch)))
    return _rates(start, stamps)


def ray_stage(table, cfg: TeacherConfig) -> dict:
    """The real stage users run: chunk planning, grouping, the actor pool writing its parts, into a fresh cache."""
    with tempfile.TemporaryDirectory() as cache_root:
        start = time.perf_counter()
        run = stage.build_cache(table, cfg, cache_root).manifest["last_run"]
        wall = time.perf_counter() - start
    return {"rows": run["rows_computed"], "wall_s": round(wall, 3),
            "with_startup_rows_per_s": round(run["rows_computed"] / wall, 2),
            "steady_rows_per_s": run["steady_rows_per_s"], "first_output_s": run["first_output_s"]}


def _rates(start: float, stamps: list[tuple[float, int]]) -> dict:
    """Same definitions as the stage's own stats: steady state starts after the first batch."""
    end, total = stamps[-1][0], sum(n for _, n in stamps)
    return {"rows": total, "wall_s": round(end - start, 3),
            "with_startup_rows_per_s": round(total / (end - start), 2),
            "steady_rows_per_s": round((total - stamps[0][1]) / (end - stamps[0][0]), 2),
            "first_output_s": round(stamps[0][0] - start, 3)}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--documents", type=float, default=0.2, help="fraction of documents in the mix")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MINILM_ID)
    args = parser.parse_args()

    n_docs = int(args.texts * args.documents)
    ray_init_start = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_init_s = time.perf_counter() - ray_init_start
    table = collect(build_mix(DataConfig(sources=[DataSource(
        path="train-text/texts.jsonl.gz", limit_queries=args.texts - n_docs, limit_documents=n_docs)]))[0])
    cfg = TeacherConfig(model=args.model, torch_threads=args.threads, num_cpus_per_actor=1, batch_size=64,
                        chunk_rows=1024)
    texts, kinds = table.column("text").to_pylist(), table.column("kind").to_pylist()

    runs = {"plain": [], "ray": []}
    for round_index in range(args.rounds):
        for name in alternating(["plain", "ray"], round_index):
            result = plain_loop(texts, kinds, cfg) if name == "plain" else ray_stage(table, cfg)
            runs[name].append(result)
            print(f"round {round_index} {name:5s} {result}", flush=True)

    summary = {
        "benchmark": "teacher_stage_vs_plain_loop",
        "model": args.model, "texts": len(table), "documents": n_docs, "threads": args.threads,
        "rounds": args.rounds, "ray_init_s": round(ray_init_s, 2), "runs": runs,
        "steady_ratio": median_ratios(runs, "plain", "steady_rows_per_s")["ray"],
        "with_startup_ratio": median_ratios(runs, "plain", "with_startup_rows_per_s")["ray"],
        "steady_ratio_per_round": [round(r["steady_rows_per_s"] / p["steady_rows_per_s"], 3)
                                   for r, p in zip(runs["ray"], runs["plain"])],
        "with_startup_ratio_per_round": [round(r["with_startup_rows_per_s"] / p["with_startup_rows_per_s"], 3)
                                         for r, p in zip(runs["ray"], runs["plain"])],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "ratio_note": "ratios are medians of per-round ratios (Ray stage / plain loop); rounds alternate the order",
        "steady_caveat": "The Ray side's steady rate is the stage's own: rows after its first chunk over the time "
                         "from that chunk's end to the last one's, as the actors stamp them (the plain loop's "
                         "starts after its first batch); with_startup_ratio includes the pool's start-up",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "teacher_throughput.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("steady_ratio", "with_startup_ratio", "steady_ratio_per_round")}))
    print(f"wrote {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
