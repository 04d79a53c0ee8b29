"""`llm-ray eval`: score a checkpoint on held-out documents and write the report.

The documents are a split of the prepared data the checkpoint was trained on (the test split
when there is one, else validation), or any files in a prepare format (``eval_data``). They are
streamed, a documents shard or a few hundred documents of a file at a time, and scored in chunks:
in this process for small sets, as Ray Data batch inference with model actors for large ones (the
same ``DocumentScorer`` either way). What stays in memory is a few numbers and the key of each
document (the bootstrap resamples documents) and, with eval.max_documents, the documents chosen.
The contamination check runs as Ray tasks over hash partitions of the training n-grams
(``eval.contamination``).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from llm_ray.checkpoint import find_model_dir, load_model, read_train_state
from llm_ray.config import Config, ConfigError, apply_override, validate
from llm_ray.data.errors import PrepareError
from llm_ray.data.pack import load_manifest
from llm_ray.data.prepare import data_dir
from llm_ray.data.sources import ReadError, iter_documents, list_sources
from llm_ray.data.splits import documents_shards, split_documents, split_rule
from llm_ray.eval import bias, contamination, metrics, tasks
from llm_ray.eval.report import write_report
from llm_ray.eval.scoring import CheckpointScorer, DocumentScorer
from llm_ray.ray_utils import init_ray
from llm_ray.storage import Location, as_location
from llm_ray.tracking import make_tracker, tracking_dir

Batches = Iterator[list[tuple[str, str]]]  # lists of (doc_key, text)
LOCAL_CHUNK_DOCS = 256  # documents per DocumentScorer call in this process: bounds its (docs, context) arrays
RAY_CHUNK_DOCS = 10_000  # documents per Ray Data job: its actors load the checkpoint once a job, the driver
# holds one chunk's texts


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


def capped(batches: Batches, limit: int | None) -> Batches:
    """batches as they come; with a limit, one list: the `limit` documents with the smallest keys, in key
    order (what sorting all and taking the first would give, through a heap of `limit` documents)."""
    if limit is None:
        return batches
    return iter([heapq.nsmallest(limit, itertools.chain.from_iterable(batches))])


def held_out_documents(cfg: Config, data_path: Location, split: str) -> tuple[str, Batches]:
    """(split, its documents, one list per documents shard, capped at eval.max_documents) of the prepared data."""
    manifest = load_manifest(data_path)
    if split == "auto":
        split = "test" if "test" in manifest["splits"] else "val"
    if split not in manifest["splits"]:
        raise EvalError(f"the data at {data_path} has no {split} split (it was prepared with data.test_fraction "
                        f"{cfg.data.test_fraction}); use --split val or prepare with data.test_fraction > 0")
    return split, capped(split_documents(data_path, cfg.data, split), cfg.eval.max_documents)


def files_documents(cfg: Config, path: str) -> Batches:
    """The documents with text of every file in a file or folder of any prepare format, streamed in lists
    of at most LOCAL_CHUNK_DOCS documents of one file, unfiltered, capped at eval.max_documents. An
    unreadable file stops the evaluation."""

    def read() -> Batches:
        for ref in list_sources([path], cfg.data):
            docs = ((k, t) for k, t in iter_documents(ref.uri, cfg.data, Counter()) if t.strip())
            try:
                while batch := list(itertools.islice(docs, LOCAL_CHUNK_DOCS)):
                    yield batch
            except ReadError as e:
                raise EvalError(f"unreadable evaluation file {ref.uri}: {e}") from None

    return capped(read(), cfg.eval.max_documents)


def take(batches: Batches, count: int) -> tuple[list[tuple[str, str]], Batches]:
    """The first batches of documents up to at least `count` documents (all, when fewer), and the rest."""
    batches, first = iter(batches), []
    for batch in batches:
        first += batch
        if len(first) >= count:
            break
    return first, batches


def chunks(batches: Batches, size: int) -> Batches:
    """The documents of batches again, in lists of `size` (the last may be shorter)."""
    buffer: list = []
    for batch in batches:
        buffer += batch
        start = 0
        while len(buffer) - start >= size:
            yield buffer[start : start + size]
            start += size
        buffer = buffer[start:]
    if buffer:
        yield buffer


class ScoreSums:
    """DocumentScorer's sums over chunks of documents: per document what the bootstrap and the plots
    need (nll_sum, tokens, bytes); loss by position summed over documents, as one (1, context) row."""

    PER_DOCUMENT = ("nll_sum", "tokens", "bytes")
    BY_POSITION = ("position_nll", "position_count")

    def __init__(self):
        self.parts: dict[str, list] = {k: [] for k in self.PER_DOCUMENT}
        self.rows: dict[str, np.ndarray] = {}

    def add(self, sums: dict) -> None:
        for k in self.PER_DOCUMENT:
            self.parts[k].append(np.asarray(sums[k]))
        for k in self.BY_POSITION:
            row = np.asarray(sums[k]).sum(axis=0, keepdims=True)
            self.rows[k] = self.rows[k] + row if k in self.rows else row

    def result(self) -> dict:
        return {**{k: np.concatenate(v) for k, v in self.parts.items()}, **self.rows}


def ray_scores(model_dir: Path, texts: list[str], e) -> dict:
    """DocumentScorer's sums of texts as Ray Data batch inference (e: the EvalConfig); positions summed."""
    import ray.data

    ds = ray.data.from_items([{"doc": i, "text": t} for i, t in enumerate(texts)])
    scored = ds.map_batches(CheckpointScorer, batch_size=8, batch_format="numpy", concurrency=e.concurrency,
                            num_cpus=e.cpus_per_actor,
                            fn_constructor_kwargs=dict(checkpoint=str(model_dir), stride=e.stride,
                                                       batch_size=e.batch_size,
                                                       threads=max(1, int(e.cpus_per_actor))))
    out = {"nll_sum": np.zeros(len(texts)), "tokens": np.zeros(len(texts), dtype=np.int64),
           "bytes": np.zeros(len(texts), dtype=np.int64)}
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):  # in any order: placed by "doc"
        for k in ScoreSums.PER_DOCUMENT:
            out[k][batch["doc"]] = batch[k]
        for k in ScoreSums.BY_POSITION:  # summed as they come: one row, not one per document
            row = batch[k].sum(axis=0, keepdims=True)
            out[k] = out[k] + row if k in out else row
    return out


def score_stream(batches: Batches, backend: str, model_dir: Path, model, tokenizer, e,
                 collected: contamination.EvalNgrams | None) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """Score the documents chunk by chunk; feed their n-grams to `collected` (when checking contamination).
    Returns the ScoreSums, the documents' keys, and the documents for the continuation task."""
    sums, keys, candidates = ScoreSums(), [], []
    need = e.prompt_tokens + e.continuation_tokens
    local = DocumentScorer(model, tokenizer, e.stride, e.batch_size)
    for chunk in chunks(batches, LOCAL_CHUNK_DOCS if backend == "local" else RAY_CHUNK_DOCS):
        texts = [t for _, t in chunk]
        sums.add(local.score(texts) if backend == "local" else ray_scores(model_dir, texts, e))
        keys += [k for k, _ in chunk]
        if len(candidates) < e.continuation_documents:
            candidates += tasks.long_enough(tokenizer, chunk, need, e.continuation_documents - len(candidates))
        if collected is not None:
            collected.add(texts)
    return sums.result(), keys, candidates


def training_split(cfg: Config, data_path: Location) -> contamination.TrainingSplit:
    """The training documents the contamination tasks read, from the prepared data folder."""
    if not (data_path / "manifest.json").is_file():
        raise EvalError(f"the contamination check needs the training split at {data_path} (set --data, or "
                        "eval.contamination=false)")
    train = (data_path / "manifest.json").read_json()["splits"].get("train", {})
    seed, thresholds = split_rule(data_path, cfg.data)
    # The split's tokens estimate its n-grams (about one per word), which size the rounds.
    tokens = train.get("document_tokens") or train.get("tokens", 0)
    return contamination.TrainingSplit(documents_shards(data_path), data_path / "dedup", seed, thresholds, tokens)


def checked_model(checkpoint: str | Path, overrides: list[str], split: str | None):
    """(model folder, model, tokenizer, config) of a checkpoint, its eval settings checked against the model."""
    try:
        model_dir = find_model_dir(checkpoint)
        model, tokenizer, saved = load_model(model_dir)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise EvalError(f"--checkpoint {checkpoint}: {e}") from None
    cfg = with_overrides(saved, list(overrides) + ([f"eval.split={split}"] if split else []))
    e, context = cfg.eval, model.spec.context_length
    if e.stride is not None and e.stride > context:
        raise ConfigError(f"eval.stride ({e.stride}) exceeds the model's context ({context})")
    if e.continuation_documents and e.prompt_tokens + e.continuation_tokens + 1 > context:
        raise ConfigError(f"eval.prompt_tokens + eval.continuation_tokens ({e.prompt_tokens} + {e.continuation_tokens})"
                          f" must fit in the model's context ({context}) after an end-of-text token")
    if tokenizer.get_vocab_size() > model.spec.vocab_size:
        raise EvalError(f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                        f"vocabulary ({model.spec.vocab_size}): they do not belong together")
    return model_dir, model, tokenizer, cfg


def start_ray(backend: str, train_split: contamination.TrainingSplit | None, e) -> contamination.EvalNgrams | None:
    """Ray, joined or started when the Ray Data backend or the contamination tasks need it; with
    contamination checked, the collector of the evaluated documents' n-grams (e: the EvalConfig)."""
    if backend != "ray" and train_split is None:
        return None
    import ray

    init_ray()  # returns at once inside a Ray task (a sweep's trial evaluating its checkpoint)
    if train_split is None:
        return None
    parts = contamination.plan_rounds(train_split.ngrams, len(train_split.shards))[0]
    return contamination.EvalNgrams(e.contamination_ngram, parts, put=ray.put)


def reported(batches: Batches) -> Batches:
    """batches, with a data folder's PrepareError (met while streaming) as an EvalError for the user."""
    try:
        yield from batches
    except PrepareError as err:
        raise EvalError(str(err)) from None


def evaluate(checkpoint: str | Path, overrides: list[str] = (), split: str | None = None,
             data_path: Path | None = None, eval_data: str | None = None, log=print) -> dict:
    """Score the checkpoint; write eval.json, eval.md and eval.png to <run>/eval; return the results."""
    started = time.time()
    model_dir, model, tokenizer, cfg = checked_model(checkpoint, overrides, split)
    e = cfg.eval
    trained_on = saved_state(model_dir).get("data_path")  # the folder training read, when recorded
    data_path = as_location(data_path or trained_on, cfg.data.s3) if (data_path or trained_on) else data_dir(cfg)
    try:
        split, batches = (None, files_documents(cfg, eval_data)) if eval_data else held_out_documents(cfg, data_path,
                                                                                                     e.split)
        first, rest = take(reported(batches), e.ray_min_documents if e.backend == "auto" else 1)  # for the backend
    except PrepareError as err:
        raise EvalError(str(err)) from None
    if not first:
        raise EvalError(f"--eval-data {eval_data}: no documents with text" if eval_data else
                        f"the {split} split of {data_path} holds no documents")
    backend = choose_backend(e, len(first))
    train_split = training_split(cfg, data_path) if e.contamination else None
    collected = start_ray(backend, train_split, e)
    log(f"eval: scoring the documents of {eval_data or f'{data_path} ({split})'} ({backend})")
    sums, keys, candidates = score_stream(itertools.chain([first], rest), backend, model_dir, model, tokenizer, e,
                                          collected)
    results = {"checkpoint": str(model_dir), "documents_from": eval_data or str(data_path), "split": split,
               "backend": backend,
               "context": model.spec.context_length, "stride": e.stride or max(1, model.spec.context_length // 2),
               **metrics.summarize(sums["nll_sum"], sums["tokens"], sums["bytes"], e.bootstrap_samples, e.seed)}
    log(f"eval: {len(keys)} documents scored")
    if e.continuation_documents:
        results["continuation"] = tasks.continuation_task(model, tokenizer, candidates, e)
    if e.bias_pairs:
        results["bias"] = bias_probe(cfg, model, tokenizer)
    if collected is not None:
        hits = contamination.training_hits(train_split, collected)
        results["contamination"] = contamination.report(keys, contamination.overlaps(hits, collected.ngrams), e)
    results["seconds"] = time.time() - started
    out = eval_folder(cfg, model_dir)
    state = saved_state(model_dir)
    write_report(results, sums, state.get("history", []), out)
    results["report"] = out.uri
    track(cfg, results, state)
    return results


def bias_probe(cfg: Config, model, tokenizer) -> dict:
    """The bias probe's figures on eval.bias_pairs (the builtin set, or a JSONL file, local or on S3)."""
    e = cfg.eval
    if e.bias_pairs == bias.BUILTIN:
        pairs = bias.templated_pairs()
    else:
        try:
            text = as_location(e.bias_pairs, cfg.data.s3, "eval.bias_pairs").read_text()
        except (OSError, ValueError) as err:
            raise EvalError(f"eval.bias_pairs: cannot read {e.bias_pairs}: {err}") from None
        try:
            pairs = bias.parse_pairs(text, e.bias_pairs)
        except bias.PairsError as err:
            raise EvalError(f"eval.bias_pairs: {err}") from None
    scores = DocumentScorer(model, tokenizer, e.stride, e.batch_size).score(
        [p["more"] for p in pairs] + [p["less"] for p in pairs])["nll_sum"]
    more, less = -scores[:len(pairs)], -scores[len(pairs):]
    return {"pairs_from": e.bias_pairs, **bias.summarize(pairs, more, less, e.bootstrap_samples, e.seed)}


def track(cfg: Config, results: dict, state: dict) -> None:
    """With tracking on, the figures go to the training run's W&B run, at its last step."""
    if cfg.tracking.backend == "none":
        return
    tracker = make_tracker(cfg, 0, tracking_dir(cfg), state.get("tracker_run_id"))
    row = {f"eval/{k}": results[k]["value"] for k in ("loss", "perplexity", "bits_per_byte")}
    row.update({f"eval/{k}_ci95_{end}": results[k]["ci95"][i] for k in ("loss", "bits_per_byte")
                for i, end in enumerate(("low", "high"))})
    for k in ("bleu", "rouge1", "rouge2", "rougeL"):
        if k in results.get("continuation", {}):
            row[f"eval/{k}"] = results["continuation"][k]
    if "contamination" in results:
        row["eval/contaminated_share"] = results["contamination"]["share"]
    if "bias" in results:
        row["eval/bias_stereotype_share"] = results["bias"]["overall"]["stereotype_share"]
    tracker.log(row, step=state.get("step", 0))
    tracker.finish()


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

    try:
        state = read_train_state(model_dir, history=False)
    except (OSError, ValueError):
        return {}
    try:  # the run's history folder: missing when the model folder was copied away from its run
        state["history"] = read_train_state(model_dir)["history"]
    except (OSError, ValueError):
        state["history"] = []
    return state
