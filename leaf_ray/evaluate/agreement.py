"""How closely a student follows its teacher beyond task scores: overlap of their top-k rankings at the same
variant, and the cosine between their vectors of the same texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

OVERLAP_K = 10


def overlap_at_k(ranking: Mapping[str, Sequence[str]], reference: Mapping[str, Sequence[str]],
                 k: int = OVERLAP_K) -> float:
    """Mean over queries of |top-k ∩ reference top-k| / k (k capped at what the reference ranked)."""
    return float(np.mean([len(set(ranking[q][:k]) & set(ref[:k])) / len(ref[:k]) for q, ref in reference.items()]))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine between two encoders' vectors of the same texts."""
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.where(den > 0, den, 1)))
