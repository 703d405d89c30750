"""The learner's optimizer and its learning-rate schedule (RL and the cold start share both).

optimizer = build_optimizer(model, cfg.learner)      AdamW with [learner]'s betas and decay
lr = peak * lr_multiplier(step, warmup, total, "cosine", floor=0.1)
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from async_rl.choices import LrSchedule
from async_rl.config import LearnerConfig


def lr_multiplier(
    step: int, warmup: int, total: int, schedule: LrSchedule, floor: float = 0.0
) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear or cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule: {schedule!r} is not one of {', '.join(get_args(LrSchedule))}")


def build_optimizer(model: torch.nn.Module, learner: LearnerConfig) -> torch.optim.AdamW:
    """The RL learner's AdamW (build it after FSDP, which swaps parameters for DTensors)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=learner.lr,
        betas=(learner.adam_beta1, learner.adam_beta2),
        weight_decay=learner.weight_decay,
    )
