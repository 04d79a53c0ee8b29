"""Exact and near-duplicate detection: normalized-text hashes, MinHash signatures, LSH, clusters.

Plain numpy; ``prepare`` runs the per-document parts on Ray Data workers and the
clustering as rounds of Ray tasks (``dedup_stage``), which link each LSH bucket's members to
one representative (edges linear in bucket size). ``near_duplicate_pairs`` and ``clusters``
do the same clustering in one process from every pair in a bucket, quadratic in bucket size:
the exact reference the tests and benchmarks compare the rounds with, never the production path.

MinHash estimates the Jaccard similarity of two documents' shingle sets: with random
hash functions h_i, P[min h_i(A) == min h_i(B)] = J(A, B). LSH splits each signature
into b bands of r rows; two documents become candidates when any band matches, which
happens with probability 1 - (1 - J^r)^b, an S-curve around the threshold. Candidates
are then checked against the threshold on their full signatures, and duplicate
clusters are the connected components of the confirmed pairs (or star edges).
"""

from __future__ import annotations

import hashlib
import itertools
import unicodedata
import zlib

import numpy as np

from llm_ray.data.text_units import words

MAX_32 = np.uint64(0xFFFFFFFF)


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-D array. By sorting: np.unique hashes since NumPy 2.3, which on
    random 64-bit values is 15 to 70 times slower than a sort (13 s against 0.2 s for 1e7)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def normalized_for_hash(text: str) -> str:
    """Text that exact duplicates share: NFC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def exact_hash(text: str) -> str:
    return hashlib.blake2b(normalized_for_hash(text).encode("utf-8"), digest_size=16).hexdigest()


def shingle_units(text: str, unit: str) -> list[str]:
    """Words (text_units.words: those the quality rules count) or characters of the normalized text."""
    norm = normalized_for_hash(text)
    return list(norm) if unit == "char" else words(norm)


def shingle_hashes(text: str, unit: str, ngram: int) -> np.ndarray:
    """Distinct 32-bit hashes of the document's n-gram shingles (uint64 array)."""
    units = shingle_units(text, unit)
    if not units:
        return np.zeros(0, dtype=np.uint64)
    # crc32 once per distinct unit (a document repeats most of its words), then gathered by position.
    ids: dict[str, int] = {}
    positions = np.fromiter(map(ids.setdefault, units, itertools.count()), dtype=np.int64, count=len(units))
    unit_hashes = np.fromiter((zlib.crc32(u.encode("utf-8")) for u in ids), dtype=np.uint64, count=len(ids))
    h = unit_hashes[np.unique(positions, return_inverse=True)[1]]
    n = min(ngram, len(h))
    # Polynomial rolling combination of n consecutive unit hashes, modulo 2^32.
    combined = np.zeros(len(h) - n + 1, dtype=np.uint64)
    for k in range(n):
        combined = (combined * np.uint64(1_000_003) + h[k : len(h) - n + 1 + k]) & MAX_32
    return distinct(combined)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of multiply-shift hashes h(x) = ((a*x + b) mod 2^64) >> 32, with a odd.

    Multiply-shift (Dietzfelbinger et al.) is universal and needs no modulo, which is
    the slow part of the classic (a*x + b) mod p in numpy.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def minhash(shingles: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The MinHash signature (num_perm,) uint32 of a set of 32-bit shingle hashes."""
    sig = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        for start in range(0, len(shingles), chunk):  # chunks bound memory at chunk x num_perm
            x = shingles[start : start + chunk, None]
            sig = np.minimum(sig, ((x * a[None, :] + b[None, :]) >> np.uint64(32)).min(axis=0))
    return sig.astype(np.uint32)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows (b * r <= num_perm) minimizing false positives + false negatives around threshold.

    The same integral datasketch uses: area under the S-curve below the threshold (pairs
    wrongly proposed) plus area above it that the curve misses.
    """
    js = np.linspace(0, 1, 1001)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        p = 1 - (1 - js**rows) ** bands
        below, above = js < threshold, js >= threshold
        err = np.trapezoid(p[below], js[below]) + np.trapezoid(1 - p[above], js[above])
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 keys: a hash of each band's rows, salted by the band index."""
    n = len(signatures)
    sig = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):  # FNV-style mixing in wrapping uint64 arithmetic
            keys = (keys ^ sig[:, :, r]) * np.uint64(1099511628211)
    return keys ^ (np.arange(bands, dtype=np.uint64) << np.uint64(56))


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)  # the smaller index is the root: deterministic


def near_duplicate_pairs(signatures: np.ndarray, threshold: float, bands: int, rows: int) -> list[tuple[int, int]]:
    """Pairs (i < j) sharing an LSH band whose signatures agree on at least `threshold` of positions.

    Every pair of every bucket: the reference for tests and benchmarks. A bucket of k templated pages
    costs k (k - 1) / 2 pairs here; production (dedup_stage.star_edges) proposes k - 1 edges.
    """
    keys = band_keys(signatures, bands, rows)
    pairs = set()
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        boundaries = np.flatnonzero(np.diff(sorted_keys)) + 1
        for group in np.split(order, boundaries):
            if len(group) < 2:
                continue
            group = np.sort(group)
            for pos, i in enumerate(group[:-1]):  # compare within a bucket (buckets are small)
                for j in group[pos + 1 :]:
                    pairs.add((int(i), int(j)))
    confirmed = [(i, j) for i, j in sorted(pairs)
                 if np.mean(signatures[i] == signatures[j]) >= threshold]
    return confirmed


def clusters(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Cluster label per item: the smallest index in its connected component."""
    uf = UnionFind(n)
    for i, j in pairs:
        uf.union(i, j)
    return np.array([uf.find(i) for i in range(n)])


