"""Stable per-row hashes: how the pipeline partitions, fingerprints and splits a text mix with no global view.

Every decision that would otherwise need the whole mix in one process (which cache part a row belongs to,
whether a cache was built from exactly these rows, which rows are held out for validation) is a pure function
of the row, so Ray Data can make it block by block, on any node, in any order, and a rerun makes it again
identically. blake2b comes from the standard library: these values address caches on disk and must not move
with a library upgrade.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

# A row's content digest is 128 bits, kept as four 32-bit pieces in int64 columns so that their sums (the
# order-independent digest of a set of rows) cannot overflow below two billion rows.
DIGEST_PIECES = 4
# Recorded in cache manifests: the layout parts follow. Any change to id_hashes must change this string, so
# caches of the old layout are refused by name instead of failing their digest checks.
CHUNKING = "blake2b-64(id, keyed 'leaf-chunk') mod chunks"


def _u64(values: Iterable[str], salt: str) -> np.ndarray:
    key = hashlib.blake2b(salt.encode(), digest_size=32).digest()  # any salt (a seed of any size) keys the hash
    return np.fromiter((int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8, key=key).digest(), "little")
                        for v in values), dtype=np.uint64)


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """A uniform 64-bit hash per id: the chunk a row belongs to, and its position within the chunk's part."""
    return _u64(ids, "leaf-chunk")


def chunk_of(ids: Iterable[str], chunks: int) -> np.ndarray:
    """The cache chunk of each id: a row's chunk depends on its id and the chunk count, nothing else."""
    return (id_hashes(ids) % np.uint64(chunks)).astype(np.int64)


def row_digests(ids: Iterable[str], texts: Iterable[str], kinds: Iterable[str]) -> np.ndarray:
    """(rows, 4) int64: each row's 128-bit content hash of (id, text, kind) as four 32-bit pieces."""
    out = [np.frombuffer(hashlib.blake2b(f"{len(i)}:{i}{len(t)}:{t}{k}".encode(), digest_size=16).digest(),
                         dtype="<u4") for i, t, k in zip(ids, texts, kinds)]
    return np.stack(out).astype(np.int64) if out else np.zeros((0, DIGEST_PIECES), dtype=np.int64)


def set_digest(rows: int, sums: Iterable[int]) -> str:
    """The digest of a set of rows from its row count and its summed row digests: independent of row order,
    so a chunk or a whole mix gets the same digest however its rows were read and partitioned."""
    return hashlib.sha256(f"{rows}:{':'.join(str(int(s)) for s in sums)}".encode()).hexdigest()[:16]


def held_out(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Whether each id belongs to the validation rows: a seeded hash below `fraction` of the range, so a row's
    membership never depends on the other rows or their order."""
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    return _u64(ids, f"leaf-val-{seed}") < np.uint64(min(int(fraction * 2**64), 2**64 - 1))
