"""Training blocks in one deterministic global order, so that a resumed run continues exactly.

The packed training split is N blocks. Epoch e visits them in a permutation seeded by
(seed, e); the *stream* is epoch 0, then epoch 1, ... end to end. A run's data position
is one number, the count of stream positions consumed by all workers together, which the
checkpoint stores.

Each micro-batch round takes the next ``world * micro`` positions: worker r gets
positions ``[p + r * micro, p + (r + 1) * micro)``. An optimizer step is ``accum`` rounds,
so it covers the ``accum * world * micro`` consecutive positions that make up the global
batch. The global batch (total_batch_tokens / block_size blocks) does not depend on the
number of workers, so step s trains on the same blocks whatever the worker count, and a
run resumed with another worker count continues with the next unseen block.

Plain numpy: no Ray, no torch. Blocks are read from memory-mapped ``.npy`` shards, so a
worker touches only the blocks it trains on.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np


class BlockOrder:
    """Global block index at each stream position: a fresh seeded permutation every epoch."""

    def __init__(self, num_blocks: int, seed: int, shuffle: bool = True):
        if num_blocks < 1:
            raise ValueError("the training split holds no blocks")
        self.num_blocks, self.seed, self.shuffle = num_blocks, seed, shuffle
        self._epoch, self._order = -1, np.arange(0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # one permutation in memory at a time (8 bytes per block)
            self._epoch = epoch
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
                           if self.shuffle else np.arange(self.num_blocks))
        return self._order

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block indices at stream positions [start, start + count), across epoch boundaries."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.num_blocks)
            take = min(count - done, self.num_blocks - offset)
            out[done : done + take] = self.epoch_order(epoch)[offset : offset + take]
            done += take
        return out

    def epoch_at(self, position: int) -> int:
        return position // self.num_blocks


class PackedBlocks:
    """Random access to packed blocks (n, block_size + 1) across .npy shards, memory-mapped."""

    def __init__(self, paths: list[str | Path]):
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} packed shard(s) not found on this worker, e.g. {missing[0]}: every worker reads "
                "the prepared data folder, so on a multi-node cluster it must be on shared storage (see --data)")
        self.shards = [np.load(str(p), mmap_mode="r") for p in paths]
        if not self.shards:
            raise ValueError("no packed shards")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The blocks at global indices, in that order."""
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.shards[0].shape[1]), dtype=self.shards[0].dtype)
        for s in np.unique(shard_of):
            mine = np.flatnonzero(shard_of == s)
            out[mine] = self.shards[s][indices[mine] - self.starts[s]]
        return out


class MicroBatches:
    """A worker's micro-batches from a stream position on: each next() gives its blocks of the
    round and moves the position past every worker's micro-batch of that round.

    With prefetch > 0, a background thread reads the next `prefetch` rounds while the current one
    trains, each passed through `prepare` there (e.g. into pinned memory for a GPU copy that overlaps).
    A round's blocks are a function of its position alone, so the batches and their order are the same;
    `position` counts the rounds handed out, not those read ahead."""

    def __init__(self, blocks: PackedBlocks, order: BlockOrder, position: int, rank: int, world: int, micro: int,
                 prefetch: int = 0, prepare: Callable[[np.ndarray], Any] | None = None):
        self.blocks, self.order = blocks, order
        self.position, self.rank, self.world, self.micro = position, rank, world, micro
        self.prefetch, self.prepare = prefetch, prepare or (lambda batch: batch)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="llm-ray-batches") if prefetch else None
        self._ahead: deque[Future] = deque()  # the rounds after `position`, read or being read, in order

    def __iter__(self):
        return self

    def _read(self, position: int):
        return self.prepare(self.blocks.take(self.order.blocks(position + self.rank * self.micro, self.micro)))

    def __next__(self):
        if self._reader is None:
            batch = self._read(self.position)
        else:
            while len(self._ahead) <= self.prefetch:
                ahead = self.position + len(self._ahead) * self.world * self.micro
                self._ahead.append(self._reader.submit(self._read, ahead))
            batch = self._ahead.popleft().result()
        self.position += self.world * self.micro
        return batch

    def close(self) -> None:
        """Stop reading ahead (the reads under way finish first)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader, self._ahead = None, deque()


def validation_batches(blocks: PackedBlocks, count: int, seed: int, rank: int, world: int,
                       micro: int) -> list[tuple[np.ndarray, float]]:
    """This worker's share of a seeded sample of `count` validation blocks, as (micro-batch, weight).

    All workers together evaluate the same blocks whatever their number (every world-th block
    of the sample each). Every worker gets the same number of micro-batches, padded with
    weight-0 ones, because under ZeRO-3 each forward pass is a collective.
    """
    sample = BlockOrder(len(blocks), seed).blocks(0, min(count, len(blocks)))
    mine = sample[rank::world]
    batches = [(blocks.take(mine[i : i + micro]), 1.0) for i in range(0, len(mine), micro)]
    per_worker = math.ceil(math.ceil(len(sample) / world) / micro)
    while len(batches) < per_worker:
        batches.append((blocks.take(sample[:1]), 0.0))
    return batches
