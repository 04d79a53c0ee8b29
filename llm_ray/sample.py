"""Sampling text from a checkpoint: used by `llm-ray generate` and after training."""

from __future__ import annotations

import torch

from llm_ray.checkpoint import load_model
from llm_ray.data.tokenizer import EOT
from llm_ray.model import generate


def complete(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, seed: int) -> str:
    """The prompt's continuation as text (the prompt itself not repeated)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    eos = tokenizer.token_to_id(EOT)
    if not ids:  # an empty prompt starts a new document
        ids = [eos]
    room = model.spec.context_length - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the model's context "
                         f"({model.spec.context_length})")
    ids = ids[-room:]  # keep the end of a long prompt
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_id=eos, seed=seed)
    new = [t for t in out[0, len(ids):].tolist() if t != eos]
    return tokenizer.decode(new)


def sample_checkpoint(checkpoint: str, prompts: list[str], max_new_tokens: int, temperature: float,
                      top_k: int | None, top_p: float | None, seed: int) -> list[str]:
    model, tokenizer, _ = load_model(checkpoint)
    return [complete(model, tokenizer, p, max_new_tokens, temperature, top_k, top_p, seed) for p in prompts]
