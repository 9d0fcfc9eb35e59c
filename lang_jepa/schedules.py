"""Schedules: pure functions of the global optimizer step (resume sets the step; nothing replays)."""

from __future__ import annotations

import math

from .config import OptimConfig


def learning_rate(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup start_lr -> lr over ``warmup_steps``, then cosine lr -> min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.start_lr + (cfg.lr - cfg.start_lr) * step / max(cfg.warmup_steps, 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(max_steps - cfg.warmup_steps, 1))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def weight_decay(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Cosine from weight_decay to final_weight_decay over the run (I-JEPA: 0.04 -> 0.4)."""
    progress = min(1.0, step / max(max_steps, 1))
    start, end = cfg.weight_decay, cfg.final_weight_decay
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear ema_start -> ema_end over the run (I-JEPA: 0.996 -> 1.0)."""
    progress = min(1.0, step / max(max_steps, 1))
    return cfg.ema_start + (cfg.ema_end - cfg.ema_start) * progress
