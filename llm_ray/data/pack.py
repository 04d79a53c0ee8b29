"""The pack stage and what training reads: documents tokenized and cut into blocks, and the manifest.

``pack`` tokenizes each kept-documents shard once, in its own task, and writes every split's blocks
(n, block_size + 1) as <split>/<shard>.npy; cross-validation's folds stream theirs through a
``BlockWriter``. ``training_manifest`` is the one definition of ``manifest.json``, which training
reads, for both.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from llm_ray.config import Config
from llm_ray.data import stages, transforms
from llm_ray.data.errors import PrepareError
from llm_ray.data.splits import assign_splits, read_kept
from llm_ray.data.stages import task_per_item
from llm_ray.data.tokenizer import eot_id
from llm_ray.memory import release_freed
from llm_ray.storage import Location, as_location

MANIFEST = "manifest.json"
ENCODE_BATCH_CHARS = 1_000_000  # about 250k tokens: ~25 MB of the tokenizer's Encoding objects
SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=2)  # one parse per worker process, not one per batch
def tokenizer_from(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def encode_batches(docs: list[str], max_chars: int = ENCODE_BATCH_CHARS):
    """docs in consecutive batches of at most max_chars characters (a longer document alone): the
    tokenizer's per-token objects of one batch are what a pack task holds, whatever the documents' length."""
    batch, chars = [], 0
    for doc in docs:
        if batch and chars + len(doc) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc)
    if batch:
        yield batch


def encode(tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Each document's token ids (uint32); the tokenizer's Encoding objects (~100 bytes a token) live one
    batch at a time."""
    ids = []
    for batch in encode_batches(docs):
        ids += [np.array(e.ids, dtype=np.uint32) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
    return ids


def pack_shard(path: Location, keep_dir: Location, tokenizer_json: str, seed: int, thresholds: tuple[float, float],
               block_size: int, dtype: str, out_dir: Location) -> dict:
    """Tokenize one shard of kept documents once and write packed blocks per split.

    Writes <out_dir>/<split>/<shard>.npy for every split present, plus <shard>.json as the
    completion marker holding block counts and target-token counts (for the unigram baseline).
    """
    release_freed()  # what the previous shard's task freed: a pack worker runs one shard after another
    table = read_kept(path, keep_dir)
    splits = assign_splits({"cluster_key": np.array(table.column("cluster_key").to_pylist(), dtype=object)},
                          seed, *thresholds)["split"]
    texts = table.column("text").to_pylist()
    tokenizer = tokenizer_from(tokenizer_json)
    eot = eot_id(tokenizer)
    name = path.stem
    result = {}
    for split in SPLITS:
        docs = [t for t, s in zip(texts, splits) if s == split]
        if not docs:
            continue
        ids = encode(tokenizer, docs)
        blocks, leftover = transforms.pack_blocks(ids, eot, block_size)
        buffer = io.BytesIO()
        np.save(buffer, blocks.astype(dtype))
        (out_dir / split / f"{name}.npy").write_bytes(buffer.getvalue())
        counts = np.bincount(blocks[:, 1:].ravel()) if len(blocks) else np.zeros(0, dtype=np.int64)
        result[split] = {"blocks": int(len(blocks)), "leftover_tokens": int(leftover), "documents": len(docs),
                         "document_tokens": sum(map(len, ids)) + len(ids),  # end-of-text included
                         "target_counts": counts.tolist()}
    (out_dir / f"{name}.json").write_json(result)
    return result


def _pack_batch(batch: dict, keep_dir: Location, **kwargs) -> dict:
    for uri in batch["uri"]:
        pack_shard(Location(str(uri), keep_dir.s3), keep_dir, **kwargs)
    return {"uri": batch["uri"]}


def pack_key(cfg: Config, tokenizer_key: str) -> str:
    return stages.stage_key("pack", tokenizer_key, cfg.data.block_size)


def pack(cfg: Config, shards: list[Location], keep_dir: Location, thresholds, tok_record: dict,
         tokenizer_path: Location, out: Location, log) -> dict:
    """Every split's blocks of every kept-documents shard, one task per shard, and the splits' totals."""
    dtype = transforms.token_dtype(tok_record["vocab_size"])
    todo = [p for p in shards if not (out / f"{p.stem}.json").is_file()]
    log(f"pack: tokenizing {len(shards)} shards ({len(shards) - len(todo)} already done)")
    if todo:
        task_per_item([{"uri": p.uri} for p in todo], _pack_batch, keep_dir=keep_dir,
                      tokenizer_json=tokenizer_path.read_text(), seed=cfg.data.split_seed,
                      thresholds=tuple(thresholds), block_size=cfg.data.block_size, dtype=dtype.name,
                      out_dir=out).materialize()
    wanted = ["train", "val"] + (["test"] if cfg.data.test_fraction > 0 else [])
    splits = {name: {"shards": [], "blocks": 0, "tokens": 0, "document_tokens": 0, "leftover_tokens": 0,
                     "documents": 0} for name in wanted}
    counts = {name: np.zeros(0, dtype=np.int64) for name in wanted}
    for shard in shards:
        stem = shard.stem
        for name, info in (out / f"{stem}.json").read_json().items():
            if name not in splits:
                continue
            s = splits[name]
            if info["blocks"]:
                s["shards"].append({"file": f"pack/{name}/{stem}.npy", "blocks": info["blocks"]})
            s["blocks"] += info["blocks"]
            s["tokens"] += info["blocks"] * cfg.data.block_size
            s["leftover_tokens"] += info["leftover_tokens"]
            s["document_tokens"] += info["document_tokens"]
            s["documents"] += info.get("documents", 0)
            c = np.asarray(info["target_counts"], dtype=np.int64)
            counts[name] = np.pad(counts[name], (0, max(0, len(c) - len(counts[name]))))
            counts[name][: len(c)] += c
    for name, s in splits.items():
        if s["blocks"] == 0:
            fraction = {"val": "raise data.val_fraction", "test": "raise data.test_fraction"}.get(name)
            advice = f"{fraction} ({getattr(cfg.data, name + '_fraction')}), " if fraction else ""
            raise PrepareError(f"the {name} split holds no full block of {cfg.data.block_size} tokens: {advice}"
                               "lower data.block_size, or add text")
    baseline = transforms.unigram_cross_entropy(counts["train"], counts["val"])
    log(f"pack: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} validation tokens; "
        f"unigram baseline {baseline:.3f} nats/token")
    return {"splits": splits, "dtype": dtype.name, "unigram_val_loss": baseline}


class BlockWriter:
    """transforms.cut_blocks over a stream of documents, written as one .npy shard per add() into
    <out>/pack/<split>/: the tokens that do not fill a block yet carry over to the next add, so the
    blocks are those of the whole stream (consecutive blocks overlap by one token) while only one
    batch of documents is held."""

    def __init__(self, out: Path, split: str, eot: int, block_size: int, dtype: np.dtype):
        self.out, self.split, self.eot, self.block_size, self.dtype = out, split, eot, block_size, dtype
        self.carry = np.zeros(0, dtype=np.int64)  # the stream's tokens from the next block's start on
        self.shards: list[dict] = []  # {"file" (relative to out), "blocks"}, in stream order
        self.documents = 0

    def add(self, token_docs: list[np.ndarray]) -> None:
        stream = np.concatenate([self.carry, transforms.token_stream(token_docs, self.eot)])
        self.documents += len(token_docs)
        blocks, self.carry = transforms.cut_blocks(stream, self.block_size)
        if len(blocks):
            file = f"pack/{self.split}/{len(self.shards):05d}.npy"
            (self.out / file).parent.mkdir(parents=True, exist_ok=True)
            np.save(self.out / file, blocks.astype(self.dtype))
            self.shards.append({"file": file, "blocks": len(blocks)})

    @property
    def blocks(self) -> int:
        return sum(s["blocks"] for s in self.shards)


def training_manifest(block_size: int, tokenizer, dtype: str, splits: dict, stage_keys: dict, **more) -> dict:
    """manifest.json: what training reads (block size, vocabulary, token dtype, the tokenizer's file, each
    split's shards, the stages' keys: a resume checks the pack stage's), plus more for the report."""
    assert "pack" in stage_keys, "a resume checks the pack stage's key"
    return {"block_size": block_size, "vocab_size": tokenizer.get_vocab_size(), "eot_id": eot_id(tokenizer),
            "dtype": dtype, "tokenizer": "tokenizer/tokenizer.json", "splits": splits, "stage_keys": stage_keys,
            **more}


def load_manifest(path: Location | Path) -> dict:
    manifest_path = as_location(path) / MANIFEST
    if not manifest_path.is_file():
        raise PrepareError(f"no prepared data at {path} (missing {MANIFEST}); run `llm-ray prepare` first")
    return manifest_path.read_json()
