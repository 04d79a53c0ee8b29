"""`llm-ray prepare`: corpus -> clean documents -> deduplicated clusters -> tokenizer -> packed shards.

Four resumable stages under ``<run_dir>/data`` (see ``stages``), run on Ray Data with the
plain functions of ``sources``, ``clean``, ``dedup`` and ``transforms``:

    documents/   read every file, clean, filter, hash and MinHash; one parquet shard per
                 group of files (doc_key, text, exact hash, signature)
    dedup/       exact + MinHash-LSH near duplicates clustered over the whole corpus from
                 the hashes and signatures alone, as rounds of Ray tasks (see dedup_stage);
                 per documents shard, the rows kept (one representative per cluster) with
                 their cluster key
    tokenizer/   byte-level BPE trained on the training split; fertility statistics
    pack/        train/val/test blocks (n, block_size + 1), uint16 where the vocab fits

Splits are assigned by a hash of each duplicate cluster's key and ``data.split_seed``. The
key is the smallest normalized-text hash among the cluster's documents: content only, so
near-copies never straddle two splits, and moving the corpus, reading it from S3 or changing
the training seed moves no document between splits. ``manifest.json`` (what training reads) and
``prepare_report.{json,md,png}`` sit at the top.
"""

from __future__ import annotations

import functools
import io
import math
import sys
import time
from pathlib import Path

import numpy as np

from llm_ray.config import Config, ConfigError
from llm_ray.data import stages, transforms
from llm_ray.data.text_units import words
from llm_ray.data.dedup_stage import dedup_stage
from llm_ray.data.documents import documents_stage
from llm_ray.data.errors import PrepareError
from llm_ray.data.report import build_report, write_report
from llm_ray.data.sources import list_sources
from llm_ray.data.splits import assign_splits, read_kept, read_kept_shards, thresholds_from_summary
from llm_ray.data.stages import task_per_item
from llm_ray.data.tokenizer import eot_id, train_bpe
from llm_ray.memory import release_freed
from llm_ray.ray_utils import alive_nodes
from llm_ray.storage import Location, StorageError, as_location, cache_dir, check_shared

MANIFEST = "manifest.json"
ENCODE_BATCH_CHARS = 1_000_000  # about 250k tokens: ~25 MB of the tokenizer's Encoding objects
SPLITS = ("train", "val", "test")


def local_sources(cfg: Config) -> dict[str, Location]:
    """The sources on this machine's disk, by field name. Every task reads the files it is given: local
    sources exist on the driver's node only (a built-in corpus too: it is cached there)."""
    named = [("data.sources", s) for s in cfg.data.sources] + [("data.decontaminate", s) for s in cfg.data.decontaminate]
    return {f"{field} ({s})": Location(str(cache_dir())) if s.startswith("builtin:")
            else Location.parse(s, field=field) for field, s in named if not s.startswith("s3://")}


def data_dir(cfg: Config) -> Location:
    """<output_dir>/<name>/data: a local folder or an S3 prefix."""
    return cfg.run_location / "data"


# ------------------------------------------------------------------ stage 3: tokenizer


def tokenizer_stage(cfg: Config, split_docs, upstream_key: str, thresholds, out: Location, log) -> dict:
    key = stages.stage_key("tokenizer", upstream_key, thresholds, cfg.data.split_seed, cfg.tokenizer.model_dump())
    if (record := stages.completed(out, key)) is not None:
        log("tokenizer: up to date, skipped")
        return record
    stages.begin(out, key)
    from ray.data.expressions import col

    t = cfg.tokenizer
    train_texts = (row["text"] for row in split_docs.filter(expr=col("split") == "train").iter_rows())
    tokenizer = train_bpe(train_texts, t.vocab_size, t.min_frequency, t.train_sample_bytes)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))
    # Statistics on held-out text: fertility (tokens per word) and bytes per token.
    n_words = n_tokens = n_bytes = 0
    for row in split_docs.filter(expr=col("split") == "val").limit(2000).iter_rows():
        ids = tokenizer.encode_batch_fast([row["text"]], add_special_tokens=False)[0].ids
        n_words += len(words(row["text"]))
        n_bytes += len(row["text"].encode("utf-8"))
        n_tokens += len(ids)
    stats = {"vocab_size": tokenizer.get_vocab_size(), "fertility": n_tokens / max(1, n_words),
             "bytes_per_token": n_bytes / max(1, n_tokens)}
    log(f"tokenizer: {stats['vocab_size']} tokens; {stats['fertility']:.2f} tokens/word, "
        f"{stats['bytes_per_token']:.2f} bytes/token on validation text")
    return stages.finish(out, key, stats)


# ------------------------------------------------------------------ stage 4: pack


@functools.lru_cache(maxsize=2)  # one parse per worker process, not one per batch
def _tokenizer_from(tokenizer_json: str):
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
    tokenizer = _tokenizer_from(tokenizer_json)
    eot = eot_id(tokenizer)
    name = path.stem
    result = {}
    for split in SPLITS:
        docs = [t for t, s in zip(texts, splits) if s == split]
        if not docs:
            continue
        ids = []  # token arrays; the tokenizer's Encoding objects (~100 bytes a token) live one batch at a time
        for batch in encode_batches(docs):
            ids += [np.array(e.ids, dtype=np.uint32) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
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


def pack_stage(cfg: Config, shards: list[Location], keep_dir: Location, thresholds, tok_record: dict,
               tokenizer_path: Location, out: Location, log) -> dict:

    key = stages.stage_key("pack", "documents-counted", tok_record["key"], cfg.data.block_size)
    if (record := stages.completed(out, key)) is not None:
        log("pack: up to date, skipped")
        return record
    stages.begin(out, key)
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
    return stages.finish(out, key, {"splits": splits, "dtype": dtype.name, "unigram_val_loss": baseline})


# ------------------------------------------------------------------ the whole stage


def prepare(cfg: Config, log=print) -> dict:
    """Run (or resume) the data stage for cfg; returns the manifest that training reads."""

    import ray.data

    # Ray Data's progress bars on long stages, when someone is watching a terminal.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    started = time.time()
    out = data_dir(cfg)

    # Tasks on other nodes write the shards: a local folder is only right on a shared filesystem.
    try:
        check_shared({"output_dir": out, **local_sources(cfg)}, alive_nodes(), cfg.data.shared_filesystem)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    out.mkdir()
    files = list_sources(cfg.data.sources, cfg.data)
    if cfg.data.max_files:
        files = files[: cfg.data.max_files]
    log(f"prepare: {len(files)} files, {sum(f.size for f in files) / 1e6:.1f} MB -> {out}")
    timings = {}

    t0 = time.time()
    docs_record = documents_stage(cfg, files, out / "documents", log)
    timings["documents"] = time.time() - t0

    t0 = time.time()
    dedup_record = dedup_stage(cfg, out / "documents", docs_record, out / "dedup", log)
    timings["dedup"] = time.time() - t0

    thresholds = thresholds_from_summary(dedup_record["split_summary"], cfg.data)
    # Not materialized: each later pass streams the kept documents from disk, so memory stays
    # flat as the corpus grows.
    shards = [out / "documents" / s for s in docs_record["shards"]]
    split_docs = read_kept_shards(shards, out / "dedup").map_batches(
        assign_splits, fn_kwargs=dict(seed=cfg.data.split_seed, val_t=thresholds[0], test_t=thresholds[1]),
        batch_format="numpy")

    t0 = time.time()
    tok_record = tokenizer_stage(cfg, split_docs, dedup_record["key"], thresholds, out / "tokenizer", log)
    timings["tokenizer"] = time.time() - t0
    if tok_record["vocab_size"] > cfg.vocab_size:
        raise PrepareError(f"tokenizer has {tok_record['vocab_size']} tokens but the model's vocabulary is "
                           f"{cfg.vocab_size}")

    t0 = time.time()
    pack_record = pack_stage(cfg, shards, out / "dedup", thresholds, tok_record, out / "tokenizer" / "tokenizer.json",
                             out / "pack", log)
    timings["pack"] = time.time() - t0

    tokenizer = _tokenizer_from((out / "tokenizer" / "tokenizer.json").read_text())
    manifest = {
        "block_size": cfg.data.block_size,
        "vocab_size": tok_record["vocab_size"],
        "eot_id": eot_id(tokenizer),
        "dtype": pack_record["dtype"],
        "tokenizer": "tokenizer/tokenizer.json",
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "documents": {s: pack_record["splits"].get(s, {}).get("documents", 0) for s in SPLITS},
        "splits": pack_record["splits"],
        "unigram_val_loss": pack_record["unigram_val_loss"],
        "split_seed": cfg.data.split_seed,
        "split_thresholds": list(thresholds),  # val, val + test: what split_documents reads
        "unigram_val_perplexity": math.exp(pack_record["unigram_val_loss"]),
        "stage_keys": {"documents": docs_record["key"], "dedup": dedup_record["key"],
                       "tokenizer": tok_record["key"], "pack": pack_record["key"]},
    }
    (out / MANIFEST).write_json(manifest)
    report = build_report(manifest, docs_record, dedup_record, tok_record, timings, time.time() - started)
    write_report(report, out)
    log(report["table"])
    return manifest


def load_manifest(path: Location | Path) -> dict:
    manifest_path = as_location(path) / MANIFEST
    if not manifest_path.is_file():
        raise PrepareError(f"no prepared data at {path} (missing {MANIFEST}); run `llm-ray prepare` first")
    return manifest_path.read_json()
