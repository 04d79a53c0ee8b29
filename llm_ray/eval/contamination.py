"""Contamination: how much of each evaluated document occurs in the training split, as Ray tasks.

Hashes are 64-bit word n-grams (``data.ngrams``): with 32-bit ones, chance collisions with the
~1e9 n-grams of a few GB of training text marked nearly every document contaminated.

Neither the driver nor any task holds the training n-grams whole:

  1. map, per group of training documents shards: the distinct n-gram hashes of their training
     documents, split into P partitions by hash % P.
  2. the evaluated documents' (document id, hash) pairs, hashed in the driver as eval streams the
     documents (``EvalNgrams``), are split the same way and put into the object store in chunks.
  3. reduce, per partition: which evaluated n-grams of the partition occur among its training
     n-grams; the hit count of each document with any.
  4. the driver adds the counts (one integer per evaluated document) and divides by each
     document's distinct n-gram count.

The rounds are submitted by one coordinating task (as dedup_stage does): Ray keeps task results
under 100 KB in the memory of the submitting process, so map outputs that small would otherwise
gather in the driver. Shards are grouped into map tasks so that each output is larger than that
in the common case (plan_rounds), and goes to the object store.

Every step but the Ray calls is a plain function of numpy arrays, tested without Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from llm_ray.data import ngrams
from llm_ray.data.splits import shard_split
from llm_ray.data.stages import column, returns, submit, task
from llm_ray.storage import Location

NGRAMS_PER_REDUCE = 1 << 24  # training n-grams a reduce task aims to hold: 128 MB of hashes
MAX_PARTITIONS = 1024
MIN_HASHES_PER_OUTPUT = 1 << 14  # 128 KB: above Ray's 100 KB inline limit, so map outputs go to the object store
EVAL_PAIRS_PER_CHUNK = 1 << 22  # (document id, hash) pairs the driver buffers before a put: 64 MB

# ---------------------------------------------------------------- plain functions


def plan_rounds(train_ngrams: int, num_shards: int) -> tuple[int, int]:
    """(partitions, shards per map task) for about train_ngrams training n-grams in num_shards shards."""
    parts = min(MAX_PARTITIONS, max(1, math.ceil(train_ngrams / NGRAMS_PER_REDUCE)))
    per_shard = max(1.0, train_ngrams / max(1, num_shards))
    return parts, min(max(1, num_shards), max(1, math.ceil(parts * MIN_HASHES_PER_OUTPUT / per_shard)))


def train_partitions(texts: Iterable[str], n: int, parts: int) -> list[np.ndarray]:
    """The distinct n-gram hashes of texts, split into parts by hash % parts."""
    per_doc = [ngrams.ngram_hashes(t, n) for t in texts]
    return ngrams.partition_hashes(ngrams.distinct(np.concatenate(per_doc)) if per_doc else ngrams.EMPTY, parts)


def partition_hits(eval_chunks: list[tuple[np.ndarray, np.ndarray]],
                   train_chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(document ids, hit counts) of the evaluated documents with n-grams among the training hashes.

    eval_chunks: (document ids, hashes) pairs of one partition; train_chunks: that partition's
    training hashes from every map task, each distinct (several chunks may hold the same hash:
    a hit counts once per evaluated n-gram, whatever the number of training copies)."""
    ids = np.concatenate([c[0] for c in eval_chunks]) if eval_chunks else np.zeros(0, np.int64)
    hashes = np.concatenate([c[1] for c in eval_chunks]) if eval_chunks else ngrams.EMPTY
    index = ngrams.index_from_pairs(ids, hashes, 0)
    seen = np.zeros(len(index.hashes), dtype=bool)
    for chunk in train_chunks:  # one chunk at a time: they stay in the object store until read
        seen[ngrams.found(index, chunk)] = True
    return np.unique(ngrams.docs_of(index, np.flatnonzero(seen)), return_counts=True)


class EvalNgrams:
    """The evaluated documents' n-grams, collected as eval streams them.

    Keeps each document's distinct n-gram count; its (document id, hash) pairs are split into
    partitions and handed to `put` (ray.put in eval, the identity in tests) about
    EVAL_PAIRS_PER_CHUNK at a time, so the driver buffers one chunk. Ids count from 0 in order."""

    def __init__(self, n: int, parts: int, put: Callable = lambda x: x):
        self.n, self.parts, self.put = n, parts, put
        self.chunks: list[list] = [[] for _ in range(parts)]  # per partition: what put returned
        self._counts: list[int] = []
        self._ids: list[np.ndarray] = []
        self._hashes: list[np.ndarray] = []
        self._buffered = 0

    def add(self, texts: list[str]) -> None:
        for text in texts:
            h = ngrams.ngram_hashes(text, self.n)
            self._ids.append(np.full(len(h), len(self._counts), dtype=np.int64))
            self._hashes.append(h)
            self._counts.append(len(h))
            self._buffered += len(h)
        if self._buffered >= EVAL_PAIRS_PER_CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        pairs = ngrams.partition_pairs(np.concatenate(self._ids), np.concatenate(self._hashes), self.parts)
        for p, (ids, hashes) in enumerate(pairs):
            if len(hashes):
                self.chunks[p].append(self.put((ids, hashes)))
        self._ids, self._hashes, self._buffered = [], [], 0

    @property
    def ngrams(self) -> np.ndarray:
        """(D,) each document's distinct n-gram count."""
        return np.array(self._counts, dtype=np.int64)


def overlaps(hits: np.ndarray, ngram_counts: np.ndarray) -> np.ndarray:
    """Per document, the share of its distinct n-grams found in training (0 for a document without words)."""
    return np.divide(hits, ngram_counts, out=np.zeros(len(hits)), where=ngram_counts > 0)


def report(keys: list[str], shares: np.ndarray, e) -> dict:
    """The contamination section of eval.json from each document's share of n-grams found in training:
    the documents above e.contamination_threshold, and the 20 with the largest share. e: the EvalConfig."""
    dirty = np.flatnonzero(shares > e.contamination_threshold)
    worst = dirty[np.argsort(-shares[dirty], kind="stable")][:20]
    return {"ngram": e.contamination_ngram, "threshold": e.contamination_threshold, "documents": len(keys),
            "contaminated": int(len(dirty)), "share": float(len(dirty) / max(1, len(keys))),
            "mean_overlap": float(shares.mean()) if len(keys) else 0.0,
            "listed": [{"document": keys[i], "overlap": float(shares[i])} for i in worst]}


# ---------------------------------------------------------------- Ray tasks (thin: read, call, return)


@dataclass
class TrainingSplit:
    """Where the training documents are and how they were split: what the map tasks read."""

    shards: list[Location]
    keep_dir: Location
    seed: int
    thresholds: tuple[float, float]
    ngrams: int  # an estimate (the split's tokens): it sizes the rounds


def _map(shards: list[Location], split: TrainingSplit, n: int, parts: int):

    # A generator: one shard's documents in memory at a time, each kept only as its hashes.
    texts = (t for s in shards for _, t in shard_split(s, split.keep_dir, "train", split.seed, split.thresholds))
    return returns(train_partitions(texts, n, parts))


def _reduce(eval_count: int, *chunks):
    """chunks: the partition's eval_count evaluated chunks, then its training chunk from every map."""
    return partition_hits(list(chunks[:eval_count]), list(chunks[eval_count:]))


def _coordinate(split: TrainingSplit, n: int, parts: int, per_map: int, num_docs: int, eval_chunks: list[list]):
    import ray

    groups = [split.shards[i : i + per_map] for i in range(0, len(split.shards), per_map)]
    mapped = [submit(_map, parts, group, split, n, parts) for group in groups]
    pending = [submit(_reduce, 1, len(eval_chunks[p]), *eval_chunks[p], *column(mapped, p))[0] for p in range(parts)]
    del mapped  # the reduces hold the map outputs now: each partition's are freed when its reduce ends
    hits = np.zeros(num_docs, dtype=np.int64)
    while pending:  # add each partition's counts as it finishes; only one is held at a time
        [done], pending = ray.wait(pending, num_returns=1)
        ids, counts = ray.get(done)
        hits[ids] += counts
    return hits


def training_hits(split: TrainingSplit, collected: EvalNgrams, per_map: int | None = None) -> np.ndarray:
    """(D,) per evaluated document: how many of its distinct n-grams occur in the training split.

    collected must have been built with put=ray.put and partitions from plan_rounds (per_map
    defaults to its choice; tests set it to exercise several map tasks). collected's chunks are handed
    to the task and dropped from collected: they are freed when the check ends, not when eval does."""
    import ray

    collected.flush()
    planned = plan_rounds(split.ngrams, len(split.shards))[1]
    pending = task(_coordinate, num_cpus=0).remote(split, collected.n, collected.parts, per_map or planned,
                                                   len(collected.ngrams), collected.chunks)
    collected.chunks = [[] for _ in range(collected.parts)]  # the task holds the references while it runs
    return ray.get(pending)
