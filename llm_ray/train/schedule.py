"""Learning-rate schedules: linear warmup, then cosine, linear, constant, inverse square root or WSD."""

from __future__ import annotations

import math


def lr_at(step: int, t) -> float:
    """Learning rate for optimizer step `step` (0-based) under TrainConfig t."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "inverse_sqrt":
        return t.lr * math.sqrt(max(1, t.warmup_steps) / (step + 1))
    if step >= t.max_steps:
        return t.min_lr
    if t.schedule == "wsd":  # warmup, stable at lr, then linear decay over the last decay_fraction of steps
        decay_start = t.max_steps - max(1, round(t.decay_fraction * t.max_steps))
        if step < decay_start:
            return t.lr
        progress = (step - decay_start) / max(1, t.max_steps - decay_start)
        return t.lr + progress * (t.min_lr - t.lr)
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.schedule == "linear":
        return t.lr + progress * (t.min_lr - t.lr)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)  # cosine
