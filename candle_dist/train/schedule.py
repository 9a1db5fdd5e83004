"""The reference learning-rate recipe: constant warm-up epochs, then cosine decay to zero."""

from __future__ import annotations

import math

from candle_dist.config import OptimConfig


def learning_rate(optim: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of global step `step` (0-based)."""
    warmup = optim.warmup_epochs * steps_per_epoch
    if step < warmup:
        return optim.warmup_lr
    decay_steps = max(1, optim.epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * optim.lr * (1.0 + math.cos(math.pi * progress))
