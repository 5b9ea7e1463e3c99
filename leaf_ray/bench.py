"""Serving throughput and latency of encoders, measured side by side.

Machines here are shared and noisy, so encoders are timed alternately in rounds with the same threads and each
rate is the median of its rounds (every round is kept beside it); compare them as ratios from one call, never
across calls.
The physical limit of a path is its useful FLOPs per second (`EncoderShape`) against the machine's measured
matmul throughput (`matmul_gflops`), with the same threads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LATENCY_BLOCK = 10  # batch-1 latencies are timed in blocks of this many queries, the encoders taking turns


def alternating(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round `round_index`: forward on even rounds, reversed on odd ones, so load that drifts during
    a benchmark hits every side alike."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def median_ratios(runs: Mapping[str, Sequence[Mapping]], baseline: str, key: str) -> dict[str, float]:
    """Per side, the median over rounds of its `key` divided by the baseline's in the same round (a ratio per round
    first, so a slow round slows both sides of its ratio)."""
    return {name: round(float(np.median([r[key] / b[key] for r, b in zip(rows, runs[baseline])])), 3)
            for name, rows in runs.items()}


def _rate(model, texts: list[str], prompt: str | None, batch_size: int) -> float:
    started = time.perf_counter()
    model.encode(texts, prompt=prompt, batch_size=batch_size, show_progress_bar=False)
    return len(texts) / (time.perf_counter() - started)


def _latency_ms(model, text: str, prompt: str | None) -> float:
    started = time.perf_counter()
    model.encode([text], prompt=prompt, show_progress_bar=False)
    return (time.perf_counter() - started) * 1000


def measure_encoders(encoders: Mapping[str, object], queries: list[str], documents: list[str],
                     prompts: Mapping[str, Mapping[str, str]] | None = None, rounds: int = 2,
                     batch_size: int = 32, latency_queries: int = 50,
                     query_rounds: int | None = None) -> dict[str, dict]:
    """docs/s and queries/s (medians of the rounds, each round's under `rounds`) and batch-1 query latency (p50/p95
    ms) per encoder, alternating encoders each round after one warm-up pass (latency: in blocks of LATENCY_BLOCK
    queries, the encoders taking turns).
    `prompts[name]` gives an encoder's query/document prompts. Queries may get more rounds than documents
    (`query_rounds`, default `rounds`): a pass over a few hundred queries takes seconds, so with two rounds
    one noisy moment on a shared machine decides the figure."""
    prompts, query_rounds = prompts or {}, query_rounds or rounds
    rounds_of: dict[str, dict[str, list[float]]] = {name: {"docs_per_s": [], "queries_per_s": []} for name in encoders}
    for name, model in encoders.items():  # warm-up: first calls allocate and pick kernels
        model.encode(queries[:8] + documents[:8], show_progress_bar=False)
    for round_index in range(max(rounds, query_rounds)):
        for name in alternating(list(encoders), round_index):
            model, p = encoders[name], prompts.get(name, {})
            if round_index < rounds:
                rounds_of[name]["docs_per_s"].append(_rate(model, documents, p.get("document") or None, batch_size))
            if round_index < query_rounds:
                rounds_of[name]["queries_per_s"].append(_rate(model, queries, p.get("query") or None, batch_size))
    results = {name: {key: round(float(np.median(values)), 2) for key, values in kept.items()}
               | {"rounds": {key: [round(v, 2) for v in values] for key, values in kept.items()}}
               for name, kept in rounds_of.items()}
    latencies: dict[str, list[float]] = {name: [] for name in encoders}
    sample = queries[:latency_queries]
    for start in range(0, len(sample), LATENCY_BLOCK):  # blocks of queries, every encoder in turn
        for name, model in encoders.items():
            prompt = prompts.get(name, {}).get("query") or None
            _latency_ms(model, sample[start], prompt)  # untimed: the previous encoder's threads settle first
            latencies[name] += [_latency_ms(model, text, prompt) for text in sample[start:start + LATENCY_BLOCK]]
    for name, lat in latencies.items():
        results[name] |= {"query_latency_p50_ms": float(np.percentile(lat, 50)),
                          "query_latency_p95_ms": float(np.percentile(lat, 95))}
    return results


@dataclass(frozen=True)
class EncoderShape:
    """What an encoder computes per token: a BERT-like stack (`layers` blocks of width `hidden` with a
    feed-forward of `intermediate`) plus linear heads (in, out) applied once per text."""

    layers: int
    hidden: int
    intermediate: int
    heads: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, model) -> EncoderShape:
        """From a loaded SentenceTransformer: its transformer's config and its Dense modules."""
        from sentence_transformers.sentence_transformer.modules import Dense

        config = model[0].auto_model.config
        heads = tuple((m.in_features, m.out_features) for m in model if isinstance(m, Dense))
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads)

    def flops(self, tokens) -> np.ndarray:
        """Forward FLOPs (2 per multiply-add) per text of `tokens` tokens: per layer the Q/K/V/output
        projections (8nh^2), the feed-forward (4nhi) and attention scores plus weighted sum (4n^2h); the
        heads once. Embedding lookups, norms, softmax and pooling are left out (a few percent)."""
        n = np.asarray(tokens, dtype=np.float64)
        h, i = self.hidden, self.intermediate
        per_layer = 8 * n * h * h + 4 * n * h * i + 4 * n * n * h
        return self.layers * per_layer + sum(2 * a * b for a, b in self.heads)


def token_counts(model, texts: list[str], prompt: str | None = None, batch_size: int = 256) -> np.ndarray:
    """Tokens per text as `model` (a SentenceTransformer) feeds them to its encoder: prompt, special tokens
    and truncation at its max_seq_length included."""
    texts = [(prompt or "") + t for t in texts]
    return np.concatenate([model.preprocess(texts[i:i + batch_size])["attention_mask"].sum(1).numpy()
                           for i in range(0, len(texts), batch_size)])


def matmul_gflops(m: int, k: int, n: int, repeats: int = 10, seed: int = 0) -> float:
    """The machine's float32 matmul throughput for an (m x k) @ (k x n) product, best of `repeats`, with the
    torch threads currently set: the ceiling a dense encoder on this CPU can approach."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best / 1e9
