"""Evaluation settings: scoring, intervals, the continuation task, contamination, where it runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from llm_ray.config.base import Section


class EvalConfig(Section):
    """What `llm-ray eval` measures on held-out documents, and how."""

    split: Literal["auto", "val", "test"] = Field(
        "auto", description="Held-out split to score: test, val, or auto (test when the data has one, else val)."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Score at most this many documents of the split or files: those with the "
        "smallest document keys, in key order (chosen while streaming, holding this many documents). null scores "
        "all, streamed a documents shard (or file) at a time."
    )
    stride: int | None = Field(
        None, ge=1, description="Sliding-window step, in tokens, for documents longer than the context: each "
        "window scores only the tokens the previous ones did not, so every token is scored once with at least "
        "context - stride tokens before it. null is half the context."
    )
    batch_size: int = Field(16, ge=1, description="Windows per forward pass when scoring.")
    bootstrap_samples: int = Field(
        1000, ge=10, description="Bootstrap resamples of the documents for the 95% intervals."
    )
    seed: int = Field(0, description="Seed of the bootstrap and of sampled continuations.")
    continuation_documents: int = Field(
        64, ge=0, description="Held-out documents used for the continuation task (BLEU, ROUGE); 0 skips it."
    )
    prompt_tokens: int = Field(32, ge=1, description="Continuation task: tokens of the document given as prompt.")
    continuation_tokens: int = Field(
        32, ge=1, description="Continuation task: tokens generated, compared with the document's next tokens."
    )
    temperature: float = Field(0.0, ge=0, description="Continuation sampling temperature; 0 is greedy.")
    top_k: int | None = Field(None, ge=1, description="Continuation: sample among the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Continuation: nucleus sampling mass.")
    samples_shown: int = Field(3, ge=0, description="Continuations quoted in the report.")
    contamination: StrictBool = Field(
        True, description="Check the scored documents for n-gram overlap with the training split."
    )
    contamination_ngram: int = Field(13, ge=1, description="Word n-gram length of the contamination check.")
    contamination_threshold: float = Field(
        0.1, ge=0, lt=1, description="A document counts as contaminated when more than this share of its "
        "n-grams occurs in the training split."
    )
    bias_pairs: str | None = Field(
        "builtin:templated", pattern=r"^(builtin:templated|s3://.+|[^:]+\.jsonl)$", description="Bias probe: a "
        "JSONL of minimal pairs, {more, less, bias_type} per line (the CrowS-Pairs format), local or s3://; the "
        "report gives the share of pairs whose more-stereotyping sentence the model prefers, per bias_type, with "
        "a bootstrap interval. builtin:templated is llm-ray's own small templated set; null skips the probe."
    )
    backend: Literal["auto", "local", "ray"] = Field(
        "auto", description="Score in this process (local), as Ray Data batch inference with model actors "
        "(ray), or auto: ray from ray_min_documents documents on."
    )
    ray_min_documents: int = Field(2000, ge=1, description="With backend auto, the size from which Ray Data scores.")
    concurrency: int = Field(2, ge=1, description="Ray Data: model actors scoring in parallel.")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray Data: CPU cores reserved by each model actor.")
