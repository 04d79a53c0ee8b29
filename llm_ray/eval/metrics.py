"""Evaluation metrics as plain functions on numbers and strings (numpy; BLEU and ROUGE through
``sacrebleu`` and ``rouge-score``).

Corpus-level figures are ratios of sums over documents (nats over tokens, nats over bytes), so
their intervals come from resampling whole documents: the bootstrap keeps each document's
tokens together, as the documents are the independent units.
"""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2)


def mean_loss(nll_sum: np.ndarray, tokens: np.ndarray) -> float:
    """Loss per token (nats) over documents, from each document's summed loss and token count."""
    return float(np.sum(nll_sum) / np.sum(tokens))


def bits_per_byte(nll_sum: np.ndarray, n_bytes: np.ndarray) -> float:
    """Bits per UTF-8 byte of text: the summed loss in bits over the bytes it encodes.

    Independent of the tokenizer: a model with a larger vocabulary predicts fewer tokens, each
    carrying more bytes, and this figure compares them fairly.
    """
    return float(np.sum(nll_sum) / LN2 / np.sum(n_bytes))


def bootstrap_ratio_ci(numerator: np.ndarray, denominator: np.ndarray, samples: int, seed: int,
                       level: float = 0.95, chunk: int = 200) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerator) / sum(denominator), resampling documents.

    numerator, denominator: (N,) per-document sums. Returns (low, high) at the given level.
    """
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    n = len(numerator)
    if n == 0:
        raise ValueError("no documents to bootstrap")
    rng = np.random.default_rng(seed)
    ratios = np.empty(samples)
    for start in range(0, samples, chunk):  # (chunk, N) indices at a time bounds memory
        rows = min(chunk, samples - start)
        idx = rng.integers(0, n, size=(rows, n))
        ratios[start : start + rows] = numerator[idx].sum(axis=1) / denominator[idx].sum(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def summarize(nll_sum: np.ndarray, tokens: np.ndarray, n_bytes: np.ndarray, samples: int, seed: int) -> dict:
    """Loss, perplexity and bits per byte, each with its 95% bootstrap interval over documents."""
    loss = mean_loss(nll_sum, tokens)
    lo, hi = bootstrap_ratio_ci(nll_sum, tokens, samples, seed)
    b_lo, b_hi = bootstrap_ratio_ci(np.asarray(nll_sum) / LN2, n_bytes, samples, seed)
    return {
        "loss": {"value": loss, "ci95": [lo, hi]},
        "perplexity": {"value": math.exp(loss), "ci95": [math.exp(lo), math.exp(hi)]},
        "bits_per_byte": {"value": bits_per_byte(nll_sum, n_bytes), "ci95": [b_lo, b_hi]},
        "documents": int(len(tokens)),
        "tokens": int(np.sum(tokens)),
        "bytes": int(np.sum(n_bytes)),
    }


def bleu(hypotheses: list[str], references: list[str] | list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, 4-grams), 0-100.

    references: one reference per hypothesis, or several streams of them (a list of lists).
    """
    import sacrebleu

    streams = references if references and isinstance(references[0], list) else [references]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over pairs (rouge-score, with stemming), 0-1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        for name, score in scorer.score(ref, hyp).items():
            totals[name] += score.fmeasure
    return {name: total / max(1, len(hypotheses)) for name, total in totals.items()}


def ngram_overlap(doc_hashes: np.ndarray, reference_hashes: np.ndarray) -> float:
    """Share of a document's distinct n-gram hashes that occur in the sorted distinct reference hashes."""
    if len(doc_hashes) == 0 or len(reference_hashes) == 0:
        return 0.0
    # One binary search per document hash: the reference (a training index) is by far the larger.
    pos = np.minimum(np.searchsorted(reference_hashes, doc_hashes), len(reference_hashes) - 1)
    return float(np.mean(reference_hashes[pos] == doc_hashes))
