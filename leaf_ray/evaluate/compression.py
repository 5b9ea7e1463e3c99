"""Smaller vectors: Matryoshka truncation, then output quantization, the (dims, quantization) variants that
evaluation derives from one set of vectors, and what a stored vector of each costs in bytes.

Quantization is symmetric (queries and documents both quantized; what a stored-and-compared index does). The
stored codes are exactly sentence-transformers' `quantize_embeddings`, so an index built with it compares the
same: int8 splits each dimension's range, calibrated on the document side's vectors (the corpus), into 256
buckets and scores with each bucket's centre; binary keeps the sign bits (its `ubinary` packing) and scores with
the dot product of +-1 vectors, which is dims - 2 * hamming distance (the same ranking as hamming).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leaf_ray.evaluate.data import EvaluationError

QUANTIZATION_BITS = {"float32": 32, "int8": 8, "binary": 1}
# quantization -> the sentence-transformers precision of its stored codes
_PRECISION = {"float32": "float32", "int8": "int8", "binary": "ubinary"}


def truncate(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Matryoshka: keep the first `dims` coordinates and renormalise (zero vectors stay zero)."""
    if not 0 < dims <= vectors.shape[1]:
        raise EvaluationError(f"cannot truncate {vectors.shape[1]}-d vectors to {dims} dims")
    cut = vectors[:, :dims]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.where(norms > 0, norms, 1)).astype(np.float32)


def bytes_per_vector(dims: int, quantization: str) -> int:
    return math.ceil(dims * QUANTIZATION_BITS[quantization] / 8)


@dataclass(frozen=True)
class Quantizer:
    """Maps vectors to what a quantized index compares, as float32 whose dot product is the quantized score:
    int8 -> bucket centres (per-dimension ranges fit on the document side), binary -> +-1."""

    kind: str
    ranges: np.ndarray | None = None  # int8: the document side's per-dimension (min, max), shape (2, dims)

    @classmethod
    def fit(cls, kind: str, documents: np.ndarray) -> Quantizer:
        if kind not in QUANTIZATION_BITS:
            raise EvaluationError(f"unknown quantization {kind!r} (known: {sorted(QUANTIZATION_BITS)})")
        if kind != "int8":
            return cls(kind)
        return cls(kind, np.vstack((documents.min(axis=0), documents.max(axis=0))).astype(np.float32))

    @property
    def step(self) -> np.ndarray:
        """The int8 bucket width per dimension, as sentence-transformers computes it (1 for a constant one)."""
        step = (self.ranges[1] - self.ranges[0]) / 255
        return np.where(step == 0, 1, step)

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """The stored form, sentence-transformers' own: int8 buckets (values outside the document side's range
        clip to its end buckets), packed sign bits (dims/8 bytes) or float32."""
        from sentence_transformers.util.quantization import quantize_embeddings

        return quantize_embeddings(vectors, precision=_PRECISION[self.kind], ranges=self.ranges)

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        codes = self.codes(vectors)
        if self.kind == "int8":
            # Bucket centres, capped at the document side's maximum, where the top bucket starts (a constant
            # dimension's one bucket, 1 wide, thus decodes to its value).
            low, high = self.ranges
            return np.minimum(low + (codes.astype(np.float32) + 128.5) * self.step, high).astype(np.float32)
        if self.kind == "binary":
            return np.unpackbits(codes, axis=1, count=vectors.shape[1]).astype(np.float32) * 2 - 1
        return codes


def derive(queries: np.ndarray, documents: np.ndarray, dims: int, quantization: str) -> tuple[np.ndarray, np.ndarray]:
    """One variant of a (query-side, document-side) pair: truncate + renormalise, then quantize both sides
    with the ranges of the document side."""
    q, d = truncate(queries, dims), truncate(documents, dims)
    quantizer = Quantizer.fit(quantization, d)
    return quantizer(q), quantizer(d)


def variants(full_dim: int, dims: Sequence[int], quantizations: Sequence[str]) -> list[tuple[int, str]]:
    """(dims, quantization) pairs: the full dimension first, then the requested Matryoshka dims, largest first."""
    bad = [d for d in dims if not 0 < d <= full_dim]
    if bad:
        raise EvaluationError(f"Matryoshka dims {bad} are not in 1..{full_dim} (the encoders' dimension)")
    unknown = [q for q in quantizations if q not in QUANTIZATION_BITS]
    if unknown or not quantizations:
        raise EvaluationError(f"quantizations {list(quantizations)}: each must be one of {list(QUANTIZATION_BITS)}")
    all_dims = sorted({full_dim, *dims}, reverse=True)
    return [(d, q) for d in all_dims for q in dict.fromkeys(quantizations)]
