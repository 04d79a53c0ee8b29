"""Autoregressive sampling with a KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import torch

from llm_ray.model.gpt import GPT, KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p.

    logits: (B, V). The most likely token always survives.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Continue prompt (B, T) by up to max_new_tokens; returns (B, T + n) with n <= max_new_tokens.

    temperature 0 is greedy decoding. Generation stops early once every row has produced
    eos_id; rows that finished earlier are padded with eos_id. The prompt and the new tokens
    must fit in the model's context.
    """
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise ValueError("prompt must be a (batch, tokens) tensor with at least one token")
    if prompt.size(1) + max_new_tokens > model.spec.context_length:
        raise ValueError(
            f"prompt ({prompt.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's context_length ({model.spec.context_length})"
        )
    was_training = model.training
    model.eval()
    device = prompt.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.spec, prompt.size(0), device, dtype)
    finished = torch.zeros(prompt.size(0), dtype=torch.bool, device=device)
    out = prompt
    logits, _ = model(prompt, cache=cache)  # prefill: one pass over the whole prompt
    for _ in range(max_new_tokens):
        last = logits[:, -1, :].float()  # (B, V)
        if temperature == 0:
            next_id = last.argmax(dim=-1, keepdim=True)
        else:
            probs = filter_logits(last / temperature, top_k, top_p).softmax(dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished[:, None], eos_id)
            finished |= next_id.squeeze(1) == eos_id
        out = torch.cat([out, next_id], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
        logits, _ = model(next_id, cache=cache)  # one new position, attending to the cache
    model.train(was_training)
    return out
