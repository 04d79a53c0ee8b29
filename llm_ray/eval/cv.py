"""`llm-ray cv`: k-fold cross-validation over document clusters.

The corpus is prepared once (``prepare``). Its kept documents, one per duplicate cluster and
outside the test split, are dealt into k folds in the order of their split hash (balanced,
and a cluster never straddles folds). For fold i, a tokenizer is trained on the other folds
only and both parts are packed into ``<run>/cv/fold-i/data``, in the format training reads.
The k training runs are Ray tasks, so they run side by side when the cluster has the
workers for them and queue otherwise. Each fold's model is then scored on its own fold with
the evaluation scorer (every token, bootstrap intervals), and ``cv.json`` / ``cv.md`` give
per-fold and mean ± std loss and bits per byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from llm_ray.config import Config
from llm_ray.data import stages, transforms
from llm_ray.data.errors import PrepareError
from llm_ray.storage import Location, as_location


def assign_folds(cluster_keys: list[str], folds: int, seed: int) -> dict[str, int]:
    """Fold of each cluster: clusters sorted by their split hash, dealt round-robin."""
    ordered = sorted(set(cluster_keys), key=lambda k: (transforms.split_key(k, seed), k))
    return {k: i % folds for i, k in enumerate(ordered)}


def fold_documents(cfg: Config, data_path: Location, folds: int) -> list[list[tuple[str, str]]]:
    """The (doc_key, text) of each fold: every kept document outside the test split."""
    from llm_ray.data.splits import assign_splits, kept_documents

    manifest = (as_location(data_path) / "manifest.json").read_json()
    val_t, test_t = manifest["split_thresholds"]
    rows = []
    for keys, texts, clusters in kept_documents(data_path):
        splits = assign_splits({"cluster_key": np.array(clusters, dtype=object)}, cfg.data.split_seed, val_t,
                               test_t)["split"]
        rows += [(k, t, c) for k, t, c, s in zip(keys, texts, clusters, splits) if s != "test"]
    if len({c for _, _, c in rows}) < folds:
        raise PrepareError(f"{len(rows)} distinct documents outside the test split: too few for {folds} folds")
    fold_of = assign_folds([c for _, _, c in rows], folds, cfg.data.split_seed)
    out: list[list[tuple[str, str]]] = [[] for _ in range(folds)]
    for key, text, cluster in sorted(rows):
        out[fold_of[cluster]].append((key, text))
    return out


def pack_fold(cfg: Config, train_docs: list[str], val_docs: list[str], out: Path) -> Path:
    """A prepared-data folder (manifest, tokenizer, packed train/val blocks) for one fold."""
    from llm_ray.data.tokenizer import eot_id, train_bpe

    t = cfg.tokenizer
    tokenizer = train_bpe(train_docs, t.vocab_size, t.min_frequency, t.train_sample_bytes)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    dtype = transforms.token_dtype(tokenizer.get_vocab_size())
    splits = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        ids = [np.array(e.ids) for e in tokenizer.encode_batch_fast(docs, add_special_tokens=False)]
        blocks, _ = transforms.pack_blocks(ids, eot_id(tokenizer), cfg.data.block_size)
        if len(blocks) == 0:
            raise PrepareError(f"a fold's {name} part holds no full block of {cfg.data.block_size} tokens: use "
                               "fewer folds or a smaller data.block_size")
        np.save(out / f"{name}.npy", blocks.astype(dtype))
        splits[name] = {"shards": [{"file": f"{name}.npy", "blocks": len(blocks)}], "blocks": len(blocks),
                        "tokens": len(blocks) * cfg.data.block_size}
    key = stages.stage_key("cv-pack", len(blocks), cfg.data.block_size, tokenizer.to_str())
    manifest = {"block_size": cfg.data.block_size, "vocab_size": tokenizer.get_vocab_size(), "dtype": dtype.name,
                "tokenizer": "tokenizer/tokenizer.json", "splits": splits,
                "stage_keys": {"pack": key}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


def _train_fold(fold_cfg: dict, data_path: str) -> str:
    """One fold's training, as a Ray task: the checkpoint folder it wrote."""
    from llm_ray.train.trainer import train

    return train(Config.model_validate(fold_cfg), Path(data_path), log=lambda *_: None).checkpoint


def cross_validate(cfg: Config, folds: int, log=print) -> dict:
    """Prepare, train one model per fold, score each on its fold; write <run>/cv/cv.{json,md}."""
    import ray

    from llm_ray.checkpoint import load_model
    from llm_ray.data.prepare import data_dir, prepare
    from llm_ray.eval import metrics
    from llm_ray.eval.scoring import DocumentScorer

    if folds < 2:
        raise PrepareError(f"--folds must be at least 2 (got {folds})")
    if cfg.run_location.remote:
        raise PrepareError(f"output_dir: {cfg.output_dir}: cross-validation keeps its fold runs in a local folder; "
                           "use a local output_dir for llm-ray cv")
    prepare(cfg, log=log)
    parts = fold_documents(cfg, data_dir(cfg), folds)
    root = cfg.run_dir / "cv"
    runs = []
    for i in range(folds):
        train_docs = [t for j, part in enumerate(parts) if j != i for _, t in part]
        path = pack_fold(cfg, train_docs, [t for _, t in parts[i]], root / f"fold-{i}" / "data")
        fold_cfg = cfg.model_copy(update={"name": f"{cfg.name}-fold-{i}", "output_dir": str(root)}, deep=True)
        runs.append((fold_cfg, path))
        log(f"cv: fold {i}: {len(parts[i])} validation documents, {len(train_docs)} training documents")
    # A task per fold: each launches its own Ray Train workers, which start when CPUs are free.
    task = ray.remote(num_cpus=0)(_train_fold)
    checkpoints = ray.get([task.remote(c.model_dump(mode="json"), str(p)) for c, p in runs])
    per_fold = []
    for i, checkpoint in enumerate(checkpoints):
        model, tokenizer, _ = load_model(checkpoint)
        texts = [t for _, t in parts[i]]
        sums = DocumentScorer(model, tokenizer, cfg.eval.stride, cfg.eval.batch_size).score(texts)
        s = metrics.summarize(sums["nll_sum"], sums["tokens"], sums["bytes"], cfg.eval.bootstrap_samples, cfg.eval.seed)
        per_fold.append({"fold": i, "checkpoint": checkpoint, "documents": len(texts), "loss": s["loss"],
                         "bits_per_byte": s["bits_per_byte"]})
        log(f"cv: fold {i}: loss {s['loss']['value']:.4f}, bits per byte {s['bits_per_byte']['value']:.4f}")
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


def cv_table(result: dict) -> str:
    lines = [f"{result['folds']}-fold cross-validation (folds by duplicate cluster)", "",
             "| fold | documents | loss (nats/token) | bits per byte |", "|---|---|---|---|"]
    for f in result["per_fold"]:
        lines.append(f"| {f['fold']} | {f['documents']} | {f['loss']['value']:.4f} | {f['bits_per_byte']['value']:.4f} |")
    lines.append(f"| mean ± std | | {result['loss']['mean']:.4f} ± {result['loss']['std']:.4f} | "
                 f"{result['bits_per_byte']['mean']:.4f} ± {result['bits_per_byte']['std']:.4f} |")
    return "\n".join(lines)
