"""The model: plain PyTorch, no Ray, DeepSpeed or W&B."""

from llm_ray.model.generate import filter_logits, generate
from llm_ray.model.gpt import GPT, GPTSpec, KVCache

__all__ = ["GPT", "GPTSpec", "KVCache", "generate", "filter_logits"]
