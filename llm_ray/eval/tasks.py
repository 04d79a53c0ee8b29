"""Evaluation tasks beyond the loss: continuing held-out documents (BLEU, ROUGE) and checking
the scored documents for n-gram overlap with the training split (contamination).

CIDEr is not here on purpose: it scores image captions against several human references and
has no meaning for a text-only language model.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from llm_ray.config import EvalConfig
from llm_ray.data import dedup
from llm_ray.data.tokenizer import eot_id
from llm_ray.eval import metrics
from llm_ray.model import generate


def continuation_task(model, tokenizer, docs: list[tuple[str, str]], e: EvalConfig) -> dict:
    """Prompt with each document's first e.prompt_tokens tokens, generate e.continuation_tokens,
    and compare with the document's next tokens: corpus BLEU, mean ROUGE-1/2/L F1, samples."""
    need = e.prompt_tokens + e.continuation_tokens  # checked to fit the context by eval.run
    eot = eot_id(tokenizer)
    chosen = []
    for key, text in docs:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= need:
            chosen.append((key, ids))
        if len(chosen) == e.continuation_documents:
            break
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
    """Sorted distinct hashes of every word n-gram of texts (normalized as for deduplication)."""
    parts = [dedup.shingle_hashes(t, "word", n) for t in texts]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def contamination(docs: list[tuple[str, str]], train_index: np.ndarray, e: EvalConfig) -> dict:
    """Share of documents more than e.contamination_threshold of whose n-grams occur in training."""
    overlaps = np.array([metrics.ngram_overlap(dedup.shingle_hashes(text, "word", e.contamination_ngram),
                                               train_index) for _, text in docs])
    dirty = np.flatnonzero(overlaps > e.contamination_threshold)
    worst = dirty[np.argsort(-overlaps[dirty], kind="stable")][:20]
    return {"ngram": e.contamination_ngram, "threshold": e.contamination_threshold, "documents": len(docs),
            "contaminated": int(len(dirty)), "share": float(len(dirty) / max(1, len(docs))),
            "mean_overlap": float(overlaps.mean()) if len(docs) else 0.0,
            "listed": [{"document": docs[i][0], "overlap": float(overlaps[i])} for i in worst]}
