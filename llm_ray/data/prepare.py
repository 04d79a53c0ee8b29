"""`llm-ray prepare`: corpus files -> split documents -> BPE tokenizer -> packed token shards.

Ray Data does the reading, tokenizing and packing; the transforms themselves are the
plain functions in ``transforms``. Output, under ``<run_dir>/data``:

    tokenizer.json          the trained byte-level BPE
    train/*.npy, val/*.npy  packed blocks, (n, block_size + 1) each, uint16 where the vocab fits
    manifest.json           shards, block and token counts, dtype, the unigram baseline
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from llm_ray.config import Config
from llm_ray.data import transforms
from llm_ray.data.corpus import resolve_sources
from llm_ray.data.tokenizer import eot_id, train_bpe

MANIFEST = "manifest.json"


class PrepareError(Exception):
    """The corpus cannot be turned into training data, described for the user."""


def data_dir(cfg: Config) -> Path:
    return cfg.run_dir / "data"


@functools.lru_cache(maxsize=4)
def _load_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def tokenize_and_pack(batch: dict, tokenizer_json: str, block_size: int, dtype: str) -> dict:
    tokenizer = _load_tokenizer(tokenizer_json)
    encodings = tokenizer.encode_batch([str(t) for t in batch["text"]], add_special_tokens=False)
    blocks, _ = transforms.pack_blocks((e.ids for e in encodings), eot_id(tokenizer), block_size)
    return {"tokens": blocks.astype(dtype)}


def _val_threshold(split_keys: np.ndarray, val_fraction: float) -> float:
    """The split_key below which a document is held out, so that both splits are non-empty."""
    if len(split_keys) < 2:
        raise PrepareError(f"the corpus has {len(split_keys)} non-empty document(s); at least 2 are needed "
                           "to hold one out for validation")
    keys = np.sort(split_keys)
    threshold = val_fraction
    if keys[0] >= threshold:  # tiny corpus: hold out the single lowest-keyed document
        threshold = float(np.nextafter(keys[0], 1.0))
    if keys[-1] < threshold:
        threshold = float(keys[-1])
    return threshold


def _write_split(ds, out: Path, tokenizer_json: str, cfg: Config, dtype: np.dtype) -> dict:
    blocks = ds.map_batches(
        tokenize_and_pack,
        fn_kwargs=dict(tokenizer_json=tokenizer_json, block_size=cfg.data.block_size, dtype=dtype.name),
        batch_size=cfg.data.docs_per_pack_batch,
        batch_format="numpy",
    )
    blocks.write_numpy(str(out), column="tokens")
    shards = []
    counts = np.zeros(0, dtype=np.int64)
    for path in sorted(out.glob("*.npy")):
        arr = np.load(path, mmap_mode="r")
        if len(arr) == 0:
            path.unlink()
            continue
        shards.append({"file": f"{out.name}/{path.name}", "blocks": int(arr.shape[0])})
        c = np.bincount(np.asarray(arr[:, 1:]).ravel())  # targets: every token but each block's first
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
    n_blocks = sum(s["blocks"] for s in shards)
    return {"shards": shards, "blocks": n_blocks, "tokens": n_blocks * cfg.data.block_size, "counts": counts}


def prepare(cfg: Config, log=print) -> dict:
    """Run the data stage for cfg; returns the manifest (also written to data_dir/manifest.json)."""
    import ray
    from ray.data.expressions import col

    started = time.time()
    files = resolve_sources(cfg.data.sources)
    if cfg.data.max_files:
        files = files[: cfg.data.max_files]
    total_bytes = sum(Path(f).stat().st_size for f in files)
    log(f"prepare: {len(files)} files, {total_bytes / 1e6:.1f} MB")

    out = data_dir(cfg)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    docs = (
        ray.data.read_binary_files(files, include_paths=True)
        .map_batches(transforms.decode_documents, fn_kwargs={"text_field": cfg.data.text_field}, batch_format="numpy")
        .map_batches(transforms.add_split_key, fn_kwargs={"seed": cfg.seed}, batch_format="numpy")
        .materialize()  # read once; the tokenizer and both splits reuse it
    )
    keys = np.array([row["split_key"] for row in docs.select_columns(["split_key"]).iter_rows()])
    threshold = _val_threshold(keys, cfg.data.val_fraction)
    val_docs = docs.filter(expr=col("split_key") < threshold)
    train_docs = docs.filter(expr=col("split_key") >= threshold)
    n_val = int((keys < threshold).sum())
    log(f"prepare: {len(keys)} documents, {len(keys) - n_val} train / {n_val} validation")

    t = cfg.tokenizer
    tokenizer = train_bpe((row["text"] for row in train_docs.iter_rows()), t.vocab_size, t.min_frequency,
                          t.train_sample_bytes)
    tokenizer.save(str(out / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size > cfg.vocab_size:
        raise PrepareError(f"tokenizer has {vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}")
    dtype = transforms.token_dtype(vocab_size)
    tokenizer_json = tokenizer.to_str()
    log(f"prepare: trained BPE tokenizer, {vocab_size} tokens")

    splits = {}
    for name, ds in (("train", train_docs), ("val", val_docs)):
        splits[name] = _write_split(ds, out / name, tokenizer_json, cfg, dtype)
        if splits[name]["blocks"] == 0:
            raise PrepareError(
                f"the {name} split holds no full block of {cfg.data.block_size} tokens; "
                "lower data.block_size or add text (or raise data.val_fraction)"
            )
    baseline = transforms.unigram_cross_entropy(splits["train"].pop("counts"), splits["val"].pop("counts"))
    manifest = {
        "block_size": cfg.data.block_size,
        "vocab_size": vocab_size,
        "eot_id": eot_id(tokenizer),
        "dtype": dtype.name,
        "tokenizer": "tokenizer.json",
        "files": len(files),
        "bytes": total_bytes,
        "documents": {"train": len(keys) - n_val, "val": n_val},
        "splits": splits,
        "unigram_val_loss": baseline,
        "unigram_val_perplexity": math.exp(baseline),
        "seconds": round(time.time() - started, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"prepare: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} validation tokens "
        f"in {manifest['seconds']} s; unigram baseline {baseline:.3f} nats/token -> {out}")
    return manifest


def load_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise PrepareError(f"no prepared data at {path} (missing {MANIFEST}); run `llm-ray prepare` first")
    return json.loads(manifest_path.read_text())
