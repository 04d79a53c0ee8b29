"""A decoder-only Transformer in plain PyTorch.

Parameter names follow GPT-2 (``transformer.wte``, ``h.0.attn.c_attn``, ``ln_f`` ...),
so GPT-2 weights map onto this model without renaming. The module imports only torch:
Ray, DeepSpeed and W&B wrap it from the outside.

Shape legend in comments: B batch, T time (tokens), C channels (n_embd),
nh heads, hs head size (C // nh), V vocabulary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass(frozen=True)
class GPTSpec:
    """The architecture of a model: everything needed to rebuild it, nothing about training."""

    vocab_size: int
    context_length: int
    n_layer: int
    n_head: int
    n_embd: int
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    dropout: float = 0.0
    bias: bool = True
    rope_theta: float = 10000.0
    qk_norm: bool = False  # normalize queries and keys per head (with `norm`) before attention
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    tie_embeddings: bool = True  # the output layer is the token embedding's weight

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap must be positive, got {self.logit_softcap}")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError("rotary position encoding needs an even head size (n_embd // n_head)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(spec: GPTSpec, dim: int | None = None) -> nn.Module:
    """The spec's norm over dim features (default n_embd)."""
    dim = dim or spec.n_embd
    if spec.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, bias=spec.bias)


def sinusoidal_table(context_length: int, dim: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": (T, C)."""
    position = torch.arange(context_length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(context_length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


def rope_tables(context_length: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, each (T, hs // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hs/2], x[..., hs/2:]) of x (B, nh, T, hs) by the angles for its positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of past positions for every layer, preallocated to the model's context.

    Each row is one sequence with its own length, so rows at different positions can decode
    in one forward pass (continuous batching): a pass names the rows it extends (default all).
    """

    def __init__(self, spec: GPTSpec, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, spec.n_head, spec.context_length, spec.n_embd // spec.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layer)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # positions cached, per row

    def positions(self, rows: torch.Tensor | None, T: int) -> torch.Tensor:
        """Absolute positions (B, T) of T new tokens appended to each of rows."""
        start = self.lengths if rows is None else self.lengths[rows]
        return start[:, None] + torch.arange(T, device=start.device)

    def update(self, layer: int, rows: torch.Tensor | None, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions (B, T) of rows; return the rows' keys and values
        up to the longest row, (B, nh, L, hs). Entries past a row's own length are masked by the caller."""
        index = torch.arange(len(self.lengths), device=k.device) if rows is None else rows
        self.k[layer][index[:, None], :, positions] = k.transpose(1, 2)  # (B, T, nh, hs) at [row, :, pos]
        self.v[layer][index[:, None], :, positions] = v.transpose(1, 2)
        end = int(positions.max()) + 1
        if rows is None:
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        return self.k[layer][rows, :, :end], self.v[layer][rows, :, :end]

    def advance(self, rows: torch.Tensor | None, T: int) -> None:
        if rows is None:
            self.lengths += T
        else:
            self.lengths[rows] += T

    def copy_row(self, source: int, target: int) -> None:
        """Make row target a copy of row source (a shared prompt, prefilled once)."""
        for layer in range(len(self.k)):
            self.k[layer][target] = self.k[layer][source]
            self.v[layer][target] = self.v[layer][source]
        self.lengths[target] = self.lengths[source]


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        self.n_head = spec.n_head
        self.dropout = spec.dropout
        self.c_attn = nn.Linear(spec.n_embd, 3 * spec.n_embd, bias=spec.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias)
        self.resid_dropout = nn.Dropout(spec.dropout)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:  # over each head's hs features: |q . k| / sqrt(hs) stays bounded by the norm weights
            self.q_norm = make_norm(spec, spec.n_embd // spec.n_head)
            self.k_norm = make_norm(spec, spec.n_embd // spec.n_head)
        # Opt-in, for interpretability: compute attention explicitly and keep its weights
        # (B, nh, T, T) in last_attention. Off, attention runs fused (SDPA) and keeps nothing.
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0,
                rows: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """With a cache: positions (B, T) are the new tokens' absolute positions in cache rows."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # before the rotation, as OLMo 2 and Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, rows, positions, k, v)  # (B, nh, L, hs): past and new keys
        dropout_p = self.dropout if self.training else 0.0
        fresh = k.size(2) == T  # every row starts at position 0: plain causal attention
        if self.keep_attention and fresh:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            self.last_attention = att.detach()
            y = F.dropout(att, dropout_p, self.training) @ v
        elif fresh:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Query t of row b sits at positions[b, t] and sees that row's keys 0 .. positions[b, t];
            # keys past a shorter row's length are masked out.
            keep = torch.arange(k.size(2), device=x.device) <= positions[:, :, None]  # (B, T, L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        self.kind = spec.mlp
        if self.kind == "swiglu":
            # 2/3 of 4C keeps the parameter count of the GELU MLP (LLaMA's choice), rounded to 8.
            hidden = 8 * ((int(8 * spec.n_embd / 3) + 7) // 8)
            self.c_fc = nn.Linear(spec.n_embd, 2 * hidden, bias=spec.bias)  # gate and value together
        else:  # gelu, relu2
            hidden = 4 * spec.n_embd
            self.c_fc = nn.Linear(spec.n_embd, hidden, bias=spec.bias)
        self.c_proj = nn.Linear(hidden, spec.n_embd, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = F.relu(h).square()  # Primer's squared ReLU
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        self.ln_1 = make_norm(spec)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x, rope=None, cache=None, layer=0, rows=None, positions=None):
        x = x + self.attn(self.ln_1(x), rope, cache, layer, rows, positions)  # pre-norm residual
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, spec: GPTSpec):
        super().__init__()
        self.spec = spec
        parts = dict(
            wte=nn.Embedding(spec.vocab_size, spec.n_embd),
            drop=nn.Dropout(spec.dropout),
            h=nn.ModuleList(Block(spec) for _ in range(spec.n_layer)),
            ln_f=make_norm(spec),
        )
        if spec.pos_encoding == "learned":
            parts["wpe"] = nn.Embedding(spec.context_length, spec.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings

        # Fixed tables are buffers, not parameters, and are not saved (they are derived).
        if spec.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(spec.context_length, spec.n_embd), persistent=False)
        if spec.pos_encoding == "rope":
            cos, sin = rope_tables(spec.context_length, spec.n_embd // spec.n_head, spec.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

        # Set from outside (training): recompute block activations in backward to save memory.
        self.activation_checkpointing = False
        for param, init in self.initializers():
            init(param)

    def initializers(self) -> list[tuple[nn.Parameter, Callable[[torch.Tensor], object]]]:
        """(parameter, function drawing its initial value), in the order the constructor applies them.

        GPT-2's scheme: normal(0, 0.02) weights, zero biases, residual projections scaled by
        1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth. Exposed so
        that a partitioned build (ZeRO-3) can draw the same values one parameter at a time.
        """
        plan = []

        def visit(module: nn.Module) -> None:  # children first, as nn.Module.apply
            for child in module.children():
                visit(child)
            if isinstance(module, nn.Linear):
                plan.append((module.weight, functools.partial(nn.init.normal_, mean=0.0, std=0.02)))
                if module.bias is not None:
                    plan.append((module.bias, nn.init.zeros_))
            elif isinstance(module, nn.Embedding):
                plan.append((module.weight, functools.partial(nn.init.normal_, mean=0.0, std=0.02)))

        visit(self)
        residual = functools.partial(nn.init.normal_, mean=0.0, std=0.02 / math.sqrt(2 * self.spec.n_layer))
        plan += [(p, residual) for name, p in self.named_parameters() if name.endswith("c_proj.weight")]
        return plan

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; with non_embedding, the parameters of embedding lookups are left out.

        Those are the position embeddings, and the token embeddings when the output layer has its
        own weight; tied, they stay in: they are the output layer, whose matmul costs FLOPs.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.spec.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T (forward and backward)."""
        s = self.spec
        T = seq_len or s.context_length
        return 6 * self.num_params() + 12 * s.n_layer * s.n_head * (s.n_embd // s.n_head) * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: torch.Tensor | None = None, last_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T), also the mean cross-entropy.

        With a cache, idx continues the cached rows (all, or the B row indices in rows), each from
        its own length, and the cache grows by T positions in those rows. last_only computes the
        logits of the last position alone, (B, 1, V): a prefill needs no others.
        """
        B, T = idx.shape
        if cache is None:
            positions = torch.arange(T, device=idx.device)[None]  # (1, T)
            end = T  # known on the host: a training step never waits on the device here
        else:
            positions = cache.positions(rows, T)  # (B, T)
            end = int(positions[:, -1].max()) + 1  # reads the device; decoding syncs each step anyway
        if end > self.spec.context_length:
            raise ValueError(f"sequence of {end} tokens exceeds context_length {self.spec.context_length}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.spec.pos_encoding == "learned":
            x = x + self.transformer.wpe(positions)
        elif self.spec.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        rope = None
        if self.spec.pos_encoding == "rope":
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])  # (B, 1, T, hs/2)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, layer, use_reentrant=False)
            else:
                x = block(x, rope, cache, layer, rows, positions)
        if cache is not None:
            cache.advance(rows, T)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.spec.logit_softcap is not None:  # Gemma 2: smoothly into (-cap, cap)
            logits = self.spec.logit_softcap * torch.tanh(logits / self.spec.logit_softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
