"""64-bit word n-gram hashes, and the index that finds evaluation text inside training text.

Plain numpy, shared by `llm-ray eval` (contamination: how much of each evaluated document
occurs in training) and prepare (decontamination: drop training documents that cover an
evaluation document).

Why 64 bits: a document's n-gram collides by chance with one of T training n-grams with
probability about T / 2^bits. With 32 bits and T = 1e9 (a few GB of text) that is 0.2, so a
fifth of every document's n-grams "occur in training" and nearly every document passes the
contamination threshold; with 64 bits it is 5e-11. The unit (word) hashes are 64-bit too: crc32
units would collide between distinct words at the same rate, whatever the combination does.

An n-gram's hash is a polynomial in its words' hashes modulo 2^64 (wrapping uint64 arithmetic),
H = sum_k h(w_k) * B^(n-1-k), followed by splitmix64's finalizer. With an odd B every power of B
is invertible modulo 2^64, so two n-grams that differ in one word differ in H unless their word
hashes collide; the finalizer (a bijection, so it adds no collisions) spreads the polynomial's
low bits, which depend only on the words' low bits, over the whole word, so that partitioning by
hash % parts is even.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from llm_ray.data.dedup import distinct, shingle_units

BASE = np.uint64(0x100000001B3)  # the 64-bit FNV prime: odd, and large enough to mix every word bit
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
EMPTY = np.zeros(0, dtype=np.uint64)


def word_hashes(words: list[str]) -> np.ndarray:
    """(len(words),) uint64: the first 8 bytes of each word's BLAKE2b digest, hashed once per distinct word."""
    ids: dict[str, int] = {}
    positions = np.fromiter((ids.setdefault(w, len(ids)) for w in words), dtype=np.int64, count=len(words))
    distinct = b"".join(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest() for w in ids)
    return np.frombuffer(distinct, dtype="<u8").astype(np.uint64)[positions]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise: a bijection of uint64 whose every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX_1
        x = (x ^ (x >> np.uint64(27))) * _MIX_2
        return x ^ (x >> np.uint64(31))


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Sorted distinct uint64 hashes of the word n-grams of the normalized text (words as dedup's
    shingle_units: each CJK character a word). A text of fewer than n words gives one hash, of all its words."""
    words = shingle_units(text, "word")
    if not words:
        return EMPTY
    h = word_hashes(words)
    n = min(n, len(h))
    count = len(h) - n + 1
    combined = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the modulo 2^64
        for k in range(n):  # n vector passes, not a Python step per n-gram
            combined = combined * BASE + h[k : k + count]
    return distinct(mix64(combined))


def partition_hashes(hashes: np.ndarray, parts: int) -> list[np.ndarray]:
    """hashes split into `parts` arrays by hash % parts (each keeps the input's order)."""
    which = (hashes % np.uint64(parts)).astype(np.int64)
    order = np.argsort(which, kind="stable")
    return np.split(hashes[order], np.searchsorted(which[order], np.arange(1, parts)))


def partition_pairs(doc_ids: np.ndarray, hashes: np.ndarray, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(doc ids, hashes) pairs split as partition_hashes splits the hashes."""
    which = (hashes % np.uint64(parts)).astype(np.int64)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(1, parts))
    return list(zip(np.split(doc_ids[order], bounds), np.split(hashes[order], bounds)))


@dataclass
class EvalIndex:
    """The n-grams of a set of evaluation documents, searchable by hash.

    hashes (H,) sorted distinct uint64; the documents holding hashes[i] are docs[starts[i]:starts[i + 1]]
    (an n-gram can occur in several documents); ngrams (D,) each document's distinct n-gram count.
    """

    hashes: np.ndarray
    starts: np.ndarray
    docs: np.ndarray
    ngrams: np.ndarray


def index_from_pairs(doc_ids: np.ndarray, hashes: np.ndarray, num_docs: int) -> EvalIndex:
    """The EvalIndex of (document id, hash) pairs, each pair once (a document's hashes are distinct)."""
    order = np.lexsort((doc_ids, hashes))
    hashes, doc_ids = hashes[order], doc_ids[order].astype(np.int64)
    first = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]]) if len(hashes) else np.zeros(0, np.int64)
    return EvalIndex(hashes[first], np.r_[first, len(hashes)].astype(np.int64), doc_ids,
                     np.bincount(doc_ids, minlength=num_docs).astype(np.int64))


def index_of(per_doc: list[np.ndarray]) -> EvalIndex:
    """The EvalIndex of each document's distinct hashes; document ids are positions in per_doc."""
    doc_ids = np.repeat(np.arange(len(per_doc), dtype=np.int64), [len(h) for h in per_doc])
    return index_from_pairs(doc_ids, np.concatenate(per_doc) if per_doc else EMPTY, len(per_doc))


def found(index: EvalIndex, hashes: np.ndarray) -> np.ndarray:
    """Positions in index.hashes of the given hashes that the index holds (one binary search each)."""
    pos = np.searchsorted(index.hashes, hashes)
    inside = pos < len(index.hashes)
    pos = pos[inside]
    return pos[index.hashes[pos] == hashes[inside]]


def docs_of(index: EvalIndex, positions: np.ndarray) -> np.ndarray:
    """The document ids of the given hash positions, one per (hash, document) pair."""
    lengths = index.starts[positions + 1] - index.starts[positions]
    # Each position's run in docs, gathered without a Python loop: start of its run + 0, 1, ..., length - 1.
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return index.docs[np.repeat(index.starts[positions], lengths) + offsets]


def overlap_with(index: EvalIndex, hashes: np.ndarray) -> tuple[int, float]:
    """(evaluation document, share): the document the distinct `hashes` of one text cover most, and
    the share of its n-grams they cover; (-1, 0.0) when they share none (one searchsorted then)."""
    positions = found(index, hashes)
    if len(positions) == 0:
        return -1, 0.0
    docs, counts = np.unique(docs_of(index, distinct(positions)), return_counts=True)
    shares = counts / index.ngrams[docs]
    best = int(np.argmax(shares))
    return int(docs[best]), float(shares[best])
