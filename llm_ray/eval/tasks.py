"""Evaluation tasks beyond the loss: continuing held-out documents (BLEU, ROUGE) and checking
the scored documents for n-gram overlap with the training split (contamination).

Contamination at scale runs as Ray tasks (``eval.contamination``); ``ngram_index`` and
``contamination`` here do the same check in one process, the whole index in memory: the
reference the tests compare the tasks with, and enough for a handful of files.

CIDEr is not here on purpose: it scores image captions against several human references and
has no meaning for a text-only language model.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from llm_ray.config import EvalConfig
from llm_ray.data import ngrams
from llm_ray.data.tokenizer import eot_id
from llm_ray.eval import metrics
from llm_ray.eval.contamination import report as contamination_report
from llm_ray.model import generate


def long_enough(tokenizer, docs: Iterable[tuple[str, str]], need: int, limit: int) -> list[tuple[str, str]]:
    """The first `limit` documents (key, text) with at least `need` tokens, in order."""
    chosen = []
    for key, text in docs:
        if len(chosen) >= limit:
            break
        if len(tokenizer.encode(text, add_special_tokens=False).ids) >= need:
            chosen.append((key, text))
    return chosen


def continuation_task(model, tokenizer, docs: list[tuple[str, str]], e: EvalConfig) -> dict:
    """Prompt with each document's first e.prompt_tokens tokens, generate e.continuation_tokens,
    and compare with the document's next tokens: corpus BLEU, mean ROUGE-1/2/L F1, samples."""
    need = e.prompt_tokens + e.continuation_tokens  # checked to fit the context by eval.run
    eot = eot_id(tokenizer)
    chosen = [(key, tokenizer.encode(text, add_special_tokens=False).ids)
              for key, text in long_enough(tokenizer, docs, need, e.continuation_documents)]
    if not chosen:
        return {"documents": 0, "note": f"no document has {need} tokens"}
    prompts = torch.tensor([[eot] + ids[: e.prompt_tokens] for _, ids in chosen])
    out = generate(model, prompts, e.continuation_tokens, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                   eos_id=eot, seed=e.seed)[:, prompts.size(1):].tolist()
    hypotheses = [tokenizer.decode(row[: row.index(eot)] if eot in row else row) for row in out]
    references = [tokenizer.decode(ids[e.prompt_tokens : need]) for _, ids in chosen]
    samples = [{"document": key, "prompt": tokenizer.decode(ids[: e.prompt_tokens]), "reference": ref,
                "generated": hyp} for (key, ids), ref, hyp in list(zip(chosen, references, hypotheses))[: e.samples_shown]]
    return {"documents": len(chosen), "bleu": metrics.bleu(hypotheses, references),
            **metrics.rouge(hypotheses, references), "samples": samples,
            "settings": {"prompt_tokens": e.prompt_tokens, "continuation_tokens": e.continuation_tokens,
                         "temperature": e.temperature, "top_k": e.top_k, "top_p": e.top_p}}


def ngram_index(texts: Iterable[str], n: int) -> np.ndarray:
    """Sorted distinct 64-bit hashes of every word n-gram of texts (data.ngrams.ngram_hashes)."""
    parts = [ngrams.ngram_hashes(t, n) for t in texts]
    return ngrams.distinct(np.concatenate(parts)) if parts else ngrams.EMPTY


def contamination(docs: list[tuple[str, str]], train_index: np.ndarray, e: EvalConfig) -> dict:
    """Share of documents more than e.contamination_threshold of whose n-grams occur in the sorted
    training hashes (ngram_index), and the most contaminated: the report of the Ray tasks, in one process."""
    overlaps = np.array([metrics.ngram_overlap(ngrams.ngram_hashes(text, e.contamination_ngram), train_index)
                         for _, text in docs])
    return contamination_report([k for k, _ in docs], overlaps, e)
