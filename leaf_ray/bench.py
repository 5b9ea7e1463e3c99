"""Serving throughput and latency of encoders, measured side by side.

Machines here are shared and noisy, so encoders are timed alternately in rounds with the same threads
and the best round of each is kept; compare them as ratios from one call, never across calls.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np


def _rate(model, texts: list[str], prompt: str | None, batch_size: int) -> float:
    started = time.perf_counter()
    model.encode(texts, prompt=prompt, batch_size=batch_size, show_progress_bar=False)
    return len(texts) / (time.perf_counter() - started)


def _latencies_ms(model, texts: list[str], prompt: str | None) -> np.ndarray:
    out = []
    for text in texts:
        started = time.perf_counter()
        model.encode([text], prompt=prompt, show_progress_bar=False)
        out.append((time.perf_counter() - started) * 1000)
    return np.asarray(out)


def measure_encoders(encoders: Mapping[str, object], queries: list[str], documents: list[str],
                     prompts: Mapping[str, Mapping[str, str]] | None = None, rounds: int = 2,
                     batch_size: int = 32, latency_queries: int = 50) -> dict[str, dict]:
    """docs/s, queries/s and batch-1 query latency (p50/p95 ms) per encoder, alternating encoders each
    round after one warm-up pass. `prompts[name]` gives an encoder's query/document prompts."""
    prompts = prompts or {}
    results: dict[str, dict] = {name: {"docs_per_s": 0.0, "queries_per_s": 0.0} for name in encoders}
    for name, model in encoders.items():  # warm-up: first calls allocate and pick kernels
        model.encode(queries[:8] + documents[:8], show_progress_bar=False)
    names = list(encoders)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            model, p = encoders[name], prompts.get(name, {})
            results[name]["docs_per_s"] = max(results[name]["docs_per_s"],
                                              _rate(model, documents, p.get("document") or None, batch_size))
            results[name]["queries_per_s"] = max(results[name]["queries_per_s"],
                                                 _rate(model, queries, p.get("query") or None, batch_size))
    for name, model in encoders.items():
        lat = _latencies_ms(model, queries[:latency_queries], prompts.get(name, {}).get("query") or None)
        results[name] |= {"query_latency_p50_ms": float(np.percentile(lat, 50)),
                          "query_latency_p95_ms": float(np.percentile(lat, 95))}
    for stats in results.values():
        stats["docs_per_s"] = round(stats["docs_per_s"], 2)
        stats["queries_per_s"] = round(stats["queries_per_s"], 2)
    return results
