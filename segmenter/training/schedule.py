"""Optimiser and learning-rate schedule of the training loop.

The schedule's progress is the larger of the step fraction and, under a wall-clock budget, the
time fraction, so a run stopped by ``train.max_minutes`` still decays its learning rate to 0.
"""

from __future__ import annotations

import math

import torch

from segmenter.config import TrainConfig


def lr_factor(train: TrainConfig, progress: float, step: int, warmup_steps: int) -> float:
    """Multiplier of ``train.lr`` at ``step``: linear warm-up, then poly or cosine decay.

    Args:
        train: ``scheduler`` is ``poly`` (nnU-Net's ``(1 - p)^0.9``) or ``cosine``.
        progress: fraction of the run done, clipped to [0, 1].
        step: optimiser steps done.
        warmup_steps: steps of linear warm-up (0: none).
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if train.scheduler == "poly":
        return (1.0 - p) ** 0.9
    return 0.5 * (1.0 + math.cos(math.pi * p))


def build_optimizer(train: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW, or SGD with Nesterov momentum (nnU-Net's)."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=train.lr, momentum=train.momentum, nesterov=True,
            weight_decay=train.weight_decay,
        )  # fmt: skip
    return torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)


__all__ = ["build_optimizer", "lr_factor"]
