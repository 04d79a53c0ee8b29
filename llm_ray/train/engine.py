"""Wrapping a plain model in DeepSpeed, from the config: the one place that builds the engine."""

from __future__ import annotations

import torch

from llm_ray.config import Config
from llm_ray.train.schedule import lr_at


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm weights and embeddings go in a no-decay group."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        is_embedding = name.endswith(("wte.weight", "wpe.weight"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON for cfg: generated, never written by hand."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * cfg.grad_accum_steps * t.num_workers,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 10**9,  # we print our own progress
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: Config):
    """DeepSpeed engine around model, with AdamW and the warmup-cosine schedule stepping per optimizer step."""
    import deepspeed

    t = cfg.train

    def schedule(optimizer):
        factor = lambda step: lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps) / t.lr  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=deepspeed_config(cfg),
        lr_scheduler=schedule,
        dist_init_required=False,  # Ray Train already set up the process group
    )
    return engine
