"""The optimiser and learning-rate schedule: AdamW with warmup then cosine decay."""
from __future__ import annotations

import math

import torch

from vaopd.config import Config

__all__ = ["total_steps", "lr_factor", "build_optimizer"]


def total_steps(cfg: Config, num_records: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * (num_records // cfg.train.prompts_per_step)))


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine down to ``min_ratio``."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(cfg: Config, student: torch.nn.Module, steps: int):
    """AdamW (no weight decay on 1-D params: norms and biases) and the warmup-cosine schedule."""
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, o.warmup_ratio, o.min_lr_ratio))
    return optimizer, scheduler
