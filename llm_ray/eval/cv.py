"""`llm-ray cv`: k-fold cross-validation over document clusters.

The corpus is prepared once (``prepare``). Its kept documents outside the test split go to k
folds by a stable hash of their duplicate cluster's key (as the splits do), so a cluster never
straddles folds and a document's fold needs no look at the others. For fold i, a tokenizer is
trained on the other folds only and both parts are packed into ``<run>/cv/fold-i/data``, in
the format training reads. Everything streams, one documents shard at a time: the folds are
passes over the prepared shards, never lists of the corpus, so memory does not grow with it.
The k training runs are Ray tasks, so they run side by side when the cluster has the workers
for them and queue otherwise. Each fold's model is then scored on its own fold with the
evaluation scorer (every token, bootstrap intervals), and ``cv.json`` / ``cv.md`` give
per-fold and mean ± std loss and bits per byte.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from llm_ray.checkpoint import load_model
from llm_ray.config import Config
from llm_ray.data import stages, transforms
from llm_ray.data.errors import PrepareError
from llm_ray.data.pack import MANIFEST, BlockWriter, encode, training_manifest
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.data.splits import assign_splits, kept_documents
from llm_ray.data.tokenizer import eot_id, train_bpe
from llm_ray.eval import metrics
from llm_ray.eval.run import LOCAL_CHUNK_DOCS, chunks
from llm_ray.eval.scoring import DocumentScorer
from llm_ray.storage import Location, as_location
from llm_ray.train.trainer import train

# A fresh pass over kept documents, one documents shard at a time: (doc keys, texts, cluster keys),
# as splits.kept_documents yields them.
Documents = Callable[[], Iterable[tuple[list[str], list[str], list[str]]]]
# A fresh pass over the documents outside the test split, one documents shard at a time: (text, fold).
Folds = Callable[[], Iterator[list[tuple[str, int]]]]


def fold_of(cluster_key: str, folds: int, seed: int) -> int:
    """A cluster's fold, from a stable hash of its key. Not the split hash itself (the folds would be
    ranges of it, fold 0 the validation split): the same hash of the key under another name. Folds
    are balanced in expectation, within a few sqrt(clusters / folds) of each other."""
    return int(transforms.split_key(f"cv-fold:{cluster_key}", seed) * folds)


def fold_passes(documents: Documents, folds: int, seed: int, thresholds: tuple[float, float]) -> Folds:
    """Passes over the documents outside the test split (split by thresholds, see splits.assign_splits),
    each with its fold."""

    def one_pass() -> Iterator[list[tuple[str, int]]]:
        for _, texts, clusters in documents():
            splits = assign_splits({"cluster_key": np.array(clusters, dtype=object)}, seed, *thresholds)["split"]
            yield [(text, fold_of(c, folds, seed)) for text, c, s in zip(texts, clusters, splits) if s != "test"]

    return one_pass


def corpus_folds(cfg: Config, data_path: Location, folds: int) -> Folds:
    """fold_passes over the kept documents of a prepared data folder."""
    manifest = (as_location(data_path) / "manifest.json").read_json()
    return fold_passes(lambda: kept_documents(data_path), folds, cfg.data.split_seed,
                       tuple(manifest["split_thresholds"]))


def pack_fold(cfg: Config, passes: Folds, fold: int, out: Path) -> dict[str, int]:
    """A prepared-data folder (manifest, tokenizer, packed train/val shards) for one fold, in two passes:
    the tokenizer learns on the other folds, then each documents shard is encoded and packed.
    Returns the documents of each part."""
    t = cfg.tokenizer
    others = (text for shard in passes() for text, f in shard if f != fold)
    tokenizer = train_bpe(others, t.vocab_size, t.min_frequency, t.train_sample_bytes)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    dtype = transforms.token_dtype(tokenizer.get_vocab_size())
    shutil.rmtree(out / "pack", ignore_errors=True)  # an earlier pack's shards: the new one may have fewer
    writers = {name: BlockWriter(out, name, eot_id(tokenizer), cfg.data.block_size, dtype) for name in ("train", "val")}
    for shard in passes():
        for name, texts in (("train", [x for x, f in shard if f != fold]), ("val", [x for x, f in shard if f == fold])):
            if texts:
                writers[name].add(encode(tokenizer, texts))
    splits = {}
    for name, writer in writers.items():
        if writer.blocks == 0:
            raise PrepareError(f"fold {fold}'s {name} part ({writer.documents} documents) holds no full block of "
                               f"{cfg.data.block_size} tokens: use fewer folds or a smaller data.block_size")
        splits[name] = {"shards": writer.shards, "blocks": writer.blocks, "tokens": writer.blocks * cfg.data.block_size}
    key = stages.stage_key("cv-pack", splits["train"]["blocks"], splits["val"]["blocks"], cfg.data.block_size,
                           tokenizer.to_str())
    manifest = training_manifest(cfg.data.block_size, tokenizer, dtype.name, splits, {"pack": key})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return {name: writer.documents for name, writer in writers.items()}


def _train_fold(fold_cfg: dict, data_path: str) -> str:
    """One fold's training, as a Ray task: the checkpoint folder it wrote."""
    return train(Config.model_validate(fold_cfg), Path(data_path), log=lambda *_: None).checkpoint


def cross_validate(cfg: Config, folds: int, log=print) -> dict:
    """Prepare, train one model per fold, score each on its fold; write <run>/cv/cv.{json,md}."""
    import ray

    if folds < 2:
        raise PrepareError(f"--folds must be at least 2 (got {folds})")
    if cfg.run_location.remote:
        raise PrepareError(f"output_dir: {cfg.output_dir}: cross-validation keeps its fold runs in a local folder; "
                           "use a local output_dir for llm-ray cv")
    prepare(cfg, log=log)
    passes = corpus_folds(cfg, data_dir(cfg), folds)
    root = cfg.run_dir / "cv"
    runs = []
    for i in range(folds):
        path = root / f"fold-{i}" / "data"
        documents = pack_fold(cfg, passes, i, path)
        fold_cfg = cfg.model_copy(update={"name": f"{cfg.name}-fold-{i}", "output_dir": str(root)}, deep=True)
        runs.append((fold_cfg, path))
        log(f"cv: fold {i}: {documents['val']} validation documents, {documents['train']} training documents")
    # A task per fold: each launches its own Ray Train workers, which start when CPUs are free.
    train_fold = stages.task(_train_fold, num_cpus=0)
    checkpoints = ray.get([train_fold.remote(c.model_dump(mode="json"), str(p)) for c, p in runs])
    per_fold = [score_fold(cfg, checkpoint, passes, i, log) for i, checkpoint in enumerate(checkpoints)]
    losses = np.array([f["loss"]["value"] for f in per_fold])
    bpbs = np.array([f["bits_per_byte"]["value"] for f in per_fold])
    result = {"folds": folds, "per_fold": per_fold,
              "loss": {"mean": float(losses.mean()), "std": float(losses.std(ddof=1))},
              "bits_per_byte": {"mean": float(bpbs.mean()), "std": float(bpbs.std(ddof=1))},
              "perplexity_of_mean_loss": math.exp(float(losses.mean())), "folder": str(root)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "cv.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (root / "cv.md").write_text(cv_table(result) + "\n", encoding="utf-8")
    return result


def score_fold(cfg: Config, checkpoint: str, passes: Folds, fold: int, log) -> dict:
    """The fold's model scored on the fold's documents, one documents shard at a time, in chunks of at
    most eval's LOCAL_CHUNK_DOCS: only the per-document sums (three numbers each) are kept for the bootstrap."""
    model, tokenizer, _ = load_model(checkpoint)
    scorer = DocumentScorer(model, tokenizer, cfg.eval.stride, cfg.eval.batch_size)
    sums: dict[str, list[np.ndarray]] = {"nll_sum": [], "tokens": [], "bytes": []}
    for shard in passes():
        for texts in chunks(iter([[text for text, f in shard if f == fold]]), LOCAL_CHUNK_DOCS):
            scored = scorer.score(texts)
            for key, parts in sums.items():
                parts.append(scored[key])
    nll_sum, tokens, n_bytes = (np.concatenate(sums[k]) for k in ("nll_sum", "tokens", "bytes"))
    s = metrics.summarize(nll_sum, tokens, n_bytes, cfg.eval.bootstrap_samples, cfg.eval.seed)
    log(f"cv: fold {fold}: loss {s['loss']['value']:.4f}, bits per byte {s['bits_per_byte']['value']:.4f}")
    return {"fold": fold, "checkpoint": checkpoint, "documents": len(tokens), "loss": s["loss"],
            "bits_per_byte": s["bits_per_byte"]}


def cv_table(result: dict) -> str:
    lines = [f"{result['folds']}-fold cross-validation (folds by duplicate cluster)", "",
             "| fold | documents | loss (nats/token) | bits per byte |", "|---|---|---|---|"]
    for f in result["per_fold"]:
        lines.append(f"| {f['fold']} | {f['documents']} | {f['loss']['value']:.4f} | {f['bits_per_byte']['value']:.4f} |")
    lines.append(f"| mean ± std | | {result['loss']['mean']:.4f} ± {result['loss']['std']:.4f} | "
                 f"{result['bits_per_byte']['mean']:.4f} ± {result['bits_per_byte']['std']:.4f} |")
    return "\n".join(lines)
