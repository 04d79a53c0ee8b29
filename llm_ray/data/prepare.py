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

import math
import sys
import time

import ray.data
from ray.data.expressions import col

from llm_ray.checkpoint.location import checkpoint_location
from llm_ray.config import Config, ConfigError
from llm_ray.data import stages
from llm_ray.data.dedup_stage import dedup_key, deduplicate
from llm_ray.data.documents import clean_documents, documents_key
from llm_ray.data.errors import PrepareError
from llm_ray.data.pack import MANIFEST, SPLITS, pack, pack_key, tokenizer_from, training_manifest
from llm_ray.data.report import build_report, write_report
from llm_ray.data.sources import FileRef, list_sources
from llm_ray.data.splits import assign_splits, read_kept_shards, thresholds_from_summary
from llm_ray.data.text_units import words
from llm_ray.data.tokenizer import train_bpe
from llm_ray.ray_utils import alive_nodes
from llm_ray.storage import Location, StorageError, cache_dir, check_shared


def local_sources(cfg: Config) -> dict[str, Location]:
    """The sources on this machine's disk, by field name. Every task reads the files it is given: local
    sources exist on the driver's node only (a built-in corpus too: it is cached there)."""
    named = [("data.sources", s) for s in cfg.data.sources] + [("data.decontaminate", s) for s in cfg.data.decontaminate]
    return {f"{field} ({s})": Location(str(cache_dir())) if s.startswith("builtin:")
            else Location.parse(s, field=field) for field, s in named if not s.startswith("s3://")}


def cluster_paths(cfg: Config, outputs: bool = True, sources: bool = False,
                  data: Location | None = None) -> dict[str, Location]:
    """The paths a step of the run reads or writes, by field name, for the one storage rule of a cluster
    of several nodes (storage.check_shared: local paths only on a shared filesystem): the outputs
    (output_dir, train.storage_path), the local sources when it reads them, the prepared data."""
    paths = {"output_dir": cfg.run_location} if outputs else {}
    if outputs and cfg.train.storage_path:  # else the checkpoints are under output_dir
        paths["train.storage_path"] = checkpoint_location(cfg)[0]
    if sources:
        paths.update(local_sources(cfg))
    if data is not None:
        paths["--data"] = data
    return paths


def data_dir(cfg: Config) -> Location:
    """<output_dir>/<name>/data: a local folder or an S3 prefix."""
    return cfg.run_location / "data"


# ------------------------------------------------------------------ stage 3: tokenizer


def tokenizer_key(cfg: Config, dedup_key: str, thresholds) -> str:
    return stages.stage_key("tokenizer", dedup_key, thresholds, cfg.data.split_seed, cfg.tokenizer.model_dump())


def train_tokenizer(cfg: Config, split_docs, out: Location, log) -> dict:
    """Byte-level BPE trained on the training split (out/tokenizer.json), and its statistics on held-out
    text: fertility (tokens per word) and bytes per token."""
    t = cfg.tokenizer
    train_texts = (row["text"] for row in split_docs.filter(expr=col("split") == "train").iter_rows())
    tokenizer = train_bpe(train_texts, t.vocab_size, t.min_frequency, t.train_sample_bytes)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise PrepareError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary is "
                           f"{cfg.vocab_size}")
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))
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
    return stats


# ------------------------------------------------------------------ the whole stage


def prepare(cfg: Config, log=print) -> dict:
    """Run (or resume) the data stage for cfg: each stage one function from its inputs to its outputs,
    run by stages.run (skipped when up to date). Returns the manifest that training reads."""
    # Ray Data's progress bars on long stages, when someone is watching a terminal.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    started = time.time()
    out = data_dir(cfg)
    files, eval_sets = input_files(cfg, out, log)
    timings = {}

    def run(name: str, key: str, build) -> dict:
        t0 = time.time()
        record = stages.run(name, out / name, key, build, log)
        timings[name] = time.time() - t0
        return record

    docs = run("documents", documents_key(cfg, files, eval_sets),
               lambda folder, key: clean_documents(cfg, files, eval_sets, folder, key, log))
    shards = [out / "documents" / s for s in docs["shards"]]
    dups = run("dedup", dedup_key(cfg, docs["key"]),
               lambda folder, _: deduplicate(cfg, out / "documents", docs, folder, log))
    thresholds = thresholds_from_summary(dups["split_summary"], cfg.data)
    # Not materialized: each later pass streams the kept documents from disk, so memory stays
    # flat as the corpus grows.
    split_docs = read_kept_shards(shards, out / "dedup").map_batches(
        assign_splits, fn_kwargs=dict(seed=cfg.data.split_seed, val_t=thresholds[0], test_t=thresholds[1]),
        batch_format="numpy")
    tok = run("tokenizer", tokenizer_key(cfg, dups["key"], thresholds),
              lambda folder, _: train_tokenizer(cfg, split_docs, folder, log))
    tokenizer_path = out / "tokenizer" / "tokenizer.json"
    packed = run("pack", pack_key(cfg, tok["key"]),
                 lambda folder, _: pack(cfg, shards, out / "dedup", thresholds, tok, tokenizer_path, folder, log))

    manifest = training_manifest(
        cfg.data.block_size, tokenizer_from(tokenizer_path.read_text()), packed["dtype"], packed["splits"],
        {"documents": docs["key"], "dedup": dups["key"], "tokenizer": tok["key"], "pack": packed["key"]},
        files=len(files), bytes=sum(f.size for f in files),
        documents={s: packed["splits"].get(s, {}).get("documents", 0) for s in SPLITS},
        unigram_val_loss=packed["unigram_val_loss"], unigram_val_perplexity=math.exp(packed["unigram_val_loss"]),
        split_seed=cfg.data.split_seed, split_thresholds=list(thresholds))  # val, val + test: what splits read
    (out / MANIFEST).write_json(manifest)
    report = build_report(manifest, docs, dups, tok, timings, time.time() - started)
    write_report(report, out)
    log(report["table"])
    return manifest


def input_files(cfg: Config, out: Location, log) -> tuple[list[FileRef], list[FileRef]]:
    """The corpus files and the evaluation sets to decontaminate against, listed once; refused when
    local paths would be read or written by other nodes."""
    # Tasks on other nodes write the shards: a local folder is only right on a shared filesystem.
    try:
        check_shared(cluster_paths(cfg, sources=True), alive_nodes(), cfg.data.shared_filesystem)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    out.mkdir()
    files = list_sources(cfg.data.sources, cfg.data)
    if cfg.data.max_files:
        files = files[: cfg.data.max_files]
    eval_sets = list_sources(cfg.data.decontaminate, cfg.data, "data.decontaminate") if cfg.data.decontaminate else []
    log(f"prepare: {len(files)} files, {sum(f.size for f in files) / 1e6:.1f} MB -> {out}")
    return files, eval_sets
