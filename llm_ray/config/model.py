"""Model architecture settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, ValidationInfo, field_validator

from llm_ray.config.base import Section


class ModelConfig(Section):
    vocab_size: int | None = Field(
        None, ge=1, description="Vocabulary size; null takes tokenizer.vocab_size (a set value must match it)."
    )
    context_length: int = Field(256, ge=8, description="Longest sequence the model attends over.")
    n_layer: int = Field(4, ge=1, description="Number of Transformer blocks.")
    n_embd: int = Field(256, ge=8, description="Width of the residual stream (embedding size).")
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = Field(
        "learned", description="Positional encoding: learned absolute (GPT-2), sinusoidal, or rotary (RoPE)."
    )
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalization before each sublayer.")
    mlp: Literal["gelu", "swiglu", "relu2"] = Field(
        "gelu", description="Feed-forward type: GELU (GPT-2), SwiGLU (Llama) or squared ReLU (relu2, Primer)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residual paths.")
    bias: StrictBool = Field(True, description="Biases in linear layers and LayerNorm (GPT-2 has them).")
    qk_norm: StrictBool = Field(
        False, description="Normalize queries and keys per head (with `norm`) before attention, as OLMo 2 and "
        "Qwen3: attention logits stay bounded however large the projections grow."
    )
    logit_softcap: float | None = Field(
        None, gt=0, description="Soft cap on the output logits, cap * tanh(logits / cap) (Gemma 2); null: uncapped."
    )
    tie_embeddings: StrictBool = Field(
        True, description="The output layer reuses the token embedding's weight (GPT-2); false gives it its own "
        "(vocab_size x n_embd more parameters)."
    )
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide n_embd.")

    @field_validator("n_head")
    @classmethod
    def _heads_divide_width(cls, n_head: int, info: ValidationInfo) -> int:
        n_embd = info.data.get("n_embd")  # absent when n_embd itself was invalid
        if n_embd is None:
            return n_head
        if n_embd % n_head:
            divisors = [d for d in range(1, min(n_embd, 64) + 1) if n_embd % d == 0]
            raise ValueError(f"must divide n_embd ({n_embd}); choose one of {divisors}")
        if info.data.get("pos_encoding") == "rope" and (n_embd // n_head) % 2:
            raise ValueError(f"pos_encoding 'rope' needs an even head size, n_embd / n_head = {n_embd // n_head}")
        return n_head
