"""Plain functions on documents and token arrays; Ray Data calls them batch by batch."""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np


def split_key(text: str, seed: int) -> float:
    """A stable number in [0, 1) from a document's content: the same on every machine and rerun."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64


def token_stream(token_docs: Iterable[np.ndarray], eot_id: int) -> np.ndarray:
    """The documents' tokens in one stream, each document followed by end-of-text."""
    parts = []
    for ids in token_docs:
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(np.array([eot_id], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def cut_blocks(stream: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, block_size + 1) blocks cut from a token stream, and the rest of the stream from the next
    block's start (the last block's final token opens it: a stream continued with more tokens goes on
    cutting the same blocks). Consecutive blocks overlap by one token, so every token is a prediction
    target once: block i is stream[i*block_size : (i+1)*block_size + 1]."""
    n_blocks = max(0, (len(stream) - 1) // block_size)
    starts = np.arange(n_blocks) * block_size
    blocks = stream[starts[:, None] + np.arange(block_size + 1)[None, :]]
    return blocks, stream[n_blocks * block_size:]


def pack_blocks(token_docs: Iterable[np.ndarray], eot_id: int, block_size: int) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by end-of-text, and cut (n, block_size + 1) blocks (see
    cut_blocks). Returns the blocks and the number of tail tokens that did not fill a block."""
    stream = token_stream(token_docs, eot_id)
    blocks, rest = cut_blocks(stream, block_size)
    return blocks, len(rest) - (1 if len(blocks) else 0)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def unigram_cross_entropy(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of eval tokens under the train unigram distribution.

    Add-one smoothing keeps unseen tokens finite. This is the loss of a model that ignores
    context entirely: a trained language model must beat it clearly.
    """
    n = max(len(train_counts), len(eval_counts))
    train = np.zeros(n) + 1.0
    train[: len(train_counts)] += train_counts
    probs = train / train.sum()
    ev = np.zeros(n)
    ev[: len(eval_counts)] = eval_counts
    return float(-(ev * np.log(probs)).sum() / ev.sum())
