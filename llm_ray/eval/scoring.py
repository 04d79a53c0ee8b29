"""Scoring documents: the loss of every token, with a sliding window past the model's context.

A document is scored as the model sees text in training: after an end-of-text token, so its
first token is predicted too. Documents longer than the context are cut into windows of
``context`` targets that start ``stride`` tokens apart; each window scores only the targets
no earlier window scored, so every token is scored exactly once, with at least
``context - stride`` tokens before it (all of them in the first window).

``DocumentScorer`` is plain PyTorch. Called on a batch of texts it returns per-document sums;
Ray Data uses the same class as a model actor (``__call__`` on a batch dict).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llm_ray.checkpoint import load_model
from llm_ray.data.tokenizer import eot_id


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over n targets: the window covers targets
    [begin, end) and scores [first_scored, end). Every target is scored once."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride ({stride}) must be between 1 and the context ({context})")
    out, begin, scored = [], 0, 0
    while n > 0:
        end = min(begin + context, n)
        out.append((begin, end, scored))
        scored = end
        if end == n:
            break
        begin += stride
    return out


class DocumentScorer:
    """Per-document summed loss (nats), token and byte counts, and loss by position in the window."""

    def __init__(self, model, tokenizer, stride: int | None = None, batch_size: int = 16):

        self.model, self.tokenizer = model.eval(), tokenizer
        self.context = model.spec.context_length
        self.stride = stride or max(1, self.context // 2)
        windows(1, self.context, self.stride)  # validates the stride
        self.batch_size = batch_size
        self.eot = eot_id(tokenizer)

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        """nll_sum (N,), tokens (N,), bytes (N,), position_nll (N, context), position_count (N, context)."""
        n_docs = len(texts)
        out = {"nll_sum": np.zeros(n_docs), "tokens": np.zeros(n_docs, dtype=np.int64),
               "bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
               "position_nll": np.zeros((n_docs, self.context)),
               "position_count": np.zeros((n_docs, self.context), dtype=np.int64)}
        jobs = []  # (doc, inputs, targets, first scored offset)
        for d, text in enumerate(texts):
            seq = [self.eot] + self.token_ids(text)
            out["tokens"][d] = len(seq) - 1
            for begin, end, scored in windows(len(seq) - 1, self.context, self.stride):
                jobs.append((d, seq[begin:end], seq[begin + 1 : end + 1], scored - begin))
        for start in range(0, len(jobs), self.batch_size):
            self._score_batch(jobs[start : start + self.batch_size], out)
        return out

    def _score_batch(self, jobs: list, out: dict) -> None:
        width = max(len(x) for _, x, _, _ in jobs)
        x = torch.full((len(jobs), width), self.eot, dtype=torch.long)
        y = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, (_, inputs, targets, _) in enumerate(jobs):
            x[i, : len(inputs)] = torch.tensor(inputs)
            y[i, : len(targets)] = torch.tensor(targets)
        logits, _ = self.model(x)  # (B, T, V); causal, so right padding changes nothing before it
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").double().numpy()  # (B, T)
        for i, (d, inputs, _, first) in enumerate(jobs):
            scored = nll[i, first : len(inputs)]
            out["nll_sum"][d] += scored.sum()
            out["position_nll"][d, first : len(inputs)] += scored
            out["position_count"][d, first : len(inputs)] += 1

    def __call__(self, batch: dict) -> dict:
        """Ray Data's entry: a batch with a 'text' column -> the same columns as score(), plus 'doc'."""
        result = self.score([str(t) for t in batch["text"]])
        return {"doc": batch["doc"], **result}


class CheckpointScorer(DocumentScorer):
    """A DocumentScorer built from a checkpoint folder: the class Ray Data's actors construct."""

    def __init__(self, checkpoint: str, stride: int | None, batch_size: int, threads: int | None = None):

        if threads:
            torch.set_num_threads(threads)
        model, tokenizer, _ = load_model(checkpoint)
        super().__init__(model, tokenizer, stride, batch_size)
