"""`llm-ray eval`: score a checkpoint on held-out documents and write the report.

The documents are a split of the prepared data the checkpoint was trained on (the test split
when there is one, else validation), or any files in a prepare format (``eval_data``). Small
sets are scored in this process, large ones as Ray Data batch inference with model actors:
the same ``DocumentScorer`` either way.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from llm_ray.checkpoint import find_model_dir, load_model
from llm_ray.config import Config, ConfigError, apply_override, validate
from llm_ray.data.errors import PrepareError
from llm_ray.eval import metrics, tasks
from llm_ray.eval.scoring import CheckpointScorer, DocumentScorer
from llm_ray.storage import Location, as_location


class EvalError(Exception):
    """The evaluation cannot run on what it was given, described for the user."""


def choose_backend(e, documents: int) -> str:
    """eval.backend resolved: auto is Ray Data from eval.ray_min_documents documents on."""
    if e.backend != "auto":
        return e.backend
    return "ray" if documents >= e.ray_min_documents else "local"


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    tree = cfg.model_dump(mode="json")
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)


def held_out_documents(cfg: Config, data_path: Location, split: str) -> tuple[str, list[tuple[str, str]]]:
    """(split, its (doc_key, text) sorted by key, at most eval.max_documents) of the prepared data."""
    from llm_ray.data.prepare import load_manifest
    from llm_ray.data.splits import split_documents

    manifest = load_manifest(data_path)
    if split == "auto":
        split = "test" if "test" in manifest["splits"] else "val"
    if split not in manifest["splits"]:
        raise EvalError(f"the data at {data_path} has no {split} split (it was prepared with data.test_fraction "
                        f"{cfg.data.test_fraction}); use --split val or prepare with data.test_fraction > 0")
    docs = sorted(d for shard in split_documents(data_path, cfg.data, split) for d in shard)
    if not docs:
        raise EvalError(f"the {split} split of {data_path} holds no documents")
    return split, docs[: cfg.eval.max_documents]


def files_documents(cfg: Config, path: str) -> list[tuple[str, str]]:
    """(doc_key, text) of every document in a file or folder of any prepare format, unfiltered."""
    from llm_ray.data.sources import list_sources, read_file

    docs, failed = [], []
    for ref in list_sources([path], cfg.data):
        result = read_file(ref, cfg.data)
        if result.error:
            failed.append(f"{ref.uri}: {result.error}")
        docs += [(k, t) for k, t in result.docs if t.strip()]
    if failed:
        raise EvalError("unreadable evaluation files:\n  " + "\n  ".join(failed[:20]))
    if not docs:
        raise EvalError(f"--eval-data {path}: no documents with text")
    return sorted(docs)[: cfg.eval.max_documents]


def score(model_dir: Path, model, tokenizer, texts: list[str], cfg: Config, backend: str, log) -> dict:
    """Per-document sums from DocumentScorer, in this process or as Ray Data batch inference."""
    e = cfg.eval
    if backend == "local":
        return DocumentScorer(model, tokenizer, e.stride, e.batch_size).score(texts)
    import ray.data

    from llm_ray.ray_utils import init_ray

    init_ray()
    log(f"eval: scoring {len(texts)} documents with Ray Data ({e.concurrency} model actors)")
    ds = ray.data.from_items([{"doc": i, "text": t} for i, t in enumerate(texts)])
    scored = ds.map_batches(CheckpointScorer, batch_size=8, batch_format="numpy", concurrency=e.concurrency,
                            num_cpus=e.cpus_per_actor,
                            fn_constructor_kwargs=dict(checkpoint=str(model_dir), stride=e.stride,
                                                       batch_size=e.batch_size,
                                                       threads=max(1, int(e.cpus_per_actor))))
    rows = sorted(scored.take_all(), key=lambda r: r["doc"])
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in
            ("nll_sum", "tokens", "bytes", "position_nll", "position_count")}


def evaluate(checkpoint: str | Path, overrides: list[str] = (), split: str | None = None,
             data_path: Path | None = None, eval_data: str | None = None, log=print) -> dict:
    """Score the checkpoint; write eval.json, eval.md and eval.png to <run>/eval; return the results."""
    from llm_ray.data.prepare import data_dir
    from llm_ray.eval.report import write_report

    started = time.time()
    try:
        model_dir = find_model_dir(checkpoint)
        model, tokenizer, saved = load_model(model_dir)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise EvalError(f"--checkpoint {checkpoint}: {e}") from None
    cfg = with_overrides(saved, list(overrides) + ([f"eval.split={split}"] if split else []))
    e = cfg.eval
    if e.stride is not None and e.stride > model.spec.context_length:
        raise ConfigError(f"eval.stride ({e.stride}) exceeds the model's context ({model.spec.context_length})")
    if e.continuation_documents and e.prompt_tokens + e.continuation_tokens + 1 > model.spec.context_length:
        raise ConfigError(f"eval.prompt_tokens + eval.continuation_tokens ({e.prompt_tokens} + {e.continuation_tokens})"
                          f" must fit in the model's context ({model.spec.context_length}) after an end-of-text token")
    if tokenizer.get_vocab_size() > model.spec.vocab_size:
        raise EvalError(f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                        f"vocabulary ({model.spec.vocab_size}): they do not belong together")
    trained_on = saved_state(model_dir).get("data_path")  # the folder training read, when recorded
    data_path = as_location(data_path or trained_on, cfg.data.s3) if (data_path or trained_on) else data_dir(cfg)
    try:
        split, docs = (None, files_documents(cfg, eval_data)) if eval_data else held_out_documents(cfg, data_path,
                                                                                                  e.split)
    except PrepareError as err:
        raise EvalError(str(err)) from None
    backend = choose_backend(e, len(docs))
    texts = [t for _, t in docs]
    log(f"eval: {len(docs)} documents from {eval_data or f'{data_path} ({split})'}, scored {backend}")
    sums = score(model_dir, model, tokenizer, texts, cfg, backend, log)
    results = {"checkpoint": str(model_dir), "documents_from": eval_data or str(data_path),
               "split": split, "backend": backend,
               "context": model.spec.context_length, "stride": e.stride or max(1, model.spec.context_length // 2),
               **metrics.summarize(sums["nll_sum"], sums["tokens"], sums["bytes"], e.bootstrap_samples, e.seed)}
    if e.continuation_documents:
        results["continuation"] = tasks.continuation_task(model, tokenizer, docs, e)
    if e.contamination:
        train = (t for shard in _train_documents(cfg, data_path) for _, t in shard)
        results["contamination"] = tasks.contamination(docs, tasks.ngram_index(train, e.contamination_ngram), e)
    results["seconds"] = time.time() - started
    out = eval_folder(cfg, model_dir)
    state = saved_state(model_dir)
    write_report(results, sums, state.get("history", []), out)
    results["report"] = out.uri
    track(cfg, results, state)
    return results


def track(cfg: Config, results: dict, state: dict) -> None:
    """With tracking on, the figures go to the training run's W&B run, at its last step."""
    if cfg.tracking.backend == "none":
        return
    from llm_ray.tracking import make_tracker

    from llm_ray.train.trainer import tracking_dir

    tracker = make_tracker(cfg, 0, tracking_dir(cfg), state.get("tracker_run_id"))
    row = {f"eval/{k}": results[k]["value"] for k in ("loss", "perplexity", "bits_per_byte")}
    row.update({f"eval/{k}_ci95_{end}": results[k]["ci95"][i] for k in ("loss", "bits_per_byte")
                for i, end in enumerate(("low", "high"))})
    for k in ("bleu", "rouge1", "rouge2", "rougeL"):
        if k in results.get("continuation", {}):
            row[f"eval/{k}"] = results["continuation"][k]
    if "contamination" in results:
        row["eval/contaminated_share"] = results["contamination"]["share"]
    tracker.log(row, step=state.get("step", 0))
    tracker.finish()


def _train_documents(cfg: Config, data_path: Location):
    from llm_ray.data.splits import split_documents

    if not (data_path / "manifest.json").is_file():
        raise EvalError(f"the contamination check needs the training split at {data_path} (set --data, or "
                        "eval.contamination=false)")
    return split_documents(data_path, cfg.data, "train")


def eval_folder(cfg: Config, model_dir: Path) -> Location:
    """<run>/eval for the run that owns the checkpoint (on S3 too), else beside the checkpoint's model folder."""
    run = cfg.run_location
    if run.remote:
        return run / "eval"
    for candidate in (run.local(), model_dir.parent):
        if candidate.is_dir():
            return Location(str(candidate)) / "eval"
    return Location(str(model_dir)) / "eval"


def saved_state(model_dir: Path) -> dict:
    from llm_ray.checkpoint import read_train_state

    try:
        return read_train_state(model_dir)
    except (OSError, ValueError):
        return {}
