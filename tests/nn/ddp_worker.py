"""A few data-parallel training steps on a fixed batch, for ``tests/nn/test_distributed.py``.

Run under torchrun (``python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py OUT
LOSS ACTIVATION CLIP``): rank r trains on sample r of :func:`fixed_batch` through the training
loop's own :class:`~segmenter.training.loop.TrainStep` (the DDP-wrapped model, the loss with
its batch-Dice statistics summed over the ranks); rank 0 saves the weights and the per-step
losses to OUT. The test runs :func:`train_steps` in one process on the whole batch and compares.
"""

from __future__ import annotations

import os
import sys

import torch

from segmenter.config import Config, config_from_dict
from segmenter.nn import distributed
from segmenter.nn.distributed import SINGLE, Dist
from segmenter.nn.losses import build_loss
from segmenter.nn.network import build_model
from segmenter.training.loop import TrainStep
from segmenter.training.schedule import build_optimizer

STEPS = 3
PATCH = 16


def step_config(loss: str, activation: str, clip: float) -> Config:
    """Tiny network, batch Dice on, float32, SGD (whose steps, unlike Adam's, scale with the
    gradient), gradient norm clipped at ``clip``."""
    return config_from_dict({
        "model": {"depth": 3, "base_filters": 4, "max_filters": 8},
        "loss": {"name": loss, "activation": activation, "batch_dice": True},
        "train": {"precision": "fp32", "device": "cpu", "threads": 1, "grad_clip": clip,
                  "optimizer": "sgd", "lr": 0.05},
        "data": {"patch_size": [PATCH] * 3, "batch_size": 2},
    })  # fmt: skip


def fixed_batch() -> dict[str, torch.Tensor]:
    """Two different samples: ``image`` (2, 1, 16, 16, 16), ``label`` (2, 1, ...) in {0, 1}."""
    gen = torch.Generator().manual_seed(7)
    image = torch.randn((2, 1, PATCH, PATCH, PATCH), generator=gen)
    label = (torch.rand((2, 1, PATCH, PATCH, PATCH), generator=gen) < 0.1).float()
    label[1, :, :8] = 0.0  # the second sample has less foreground: batch Dice differs
    return {"image": image, "label": label}


def train_steps(cfg: Config, dist: Dist) -> tuple[dict[str, torch.Tensor], list[float]]:
    """:data:`STEPS` optimiser steps on this rank's share of :func:`fixed_batch`."""
    torch.manual_seed(0)
    out_channels = 1 if cfg.loss.activation == "sigmoid" else 2
    model = build_model(cfg.model, 1, out_channels, patch_size=(PATCH,) * 3).place(
        torch.device("cpu")
    )
    model.train()
    step = TrainStep(
        cfg=cfg,
        model=distributed.wrap_model(model, dist, unused_parameters=False),
        loss_fn=build_loss(cfg.loss, sync=dist if dist.active else None),
        optimizer=build_optimizer(cfg.train, model),
        device=torch.device("cpu"),
        dist=dist,
    )
    share = distributed.per_rank_batch(2, dist)
    batch = {k: v[dist.rank * share : (dist.rank + 1) * share] for k, v in fixed_batch().items()}
    losses = [step(batch) for _ in range(STEPS)]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def main(out: str, loss: str, activation: str, clip: str) -> None:
    """Train under torchrun's process group; rank 0 saves ``{"model", "losses"}`` to ``out``."""
    torch.set_num_threads(1)
    dist = distributed.from_environment(os.environ)
    cfg = step_config(loss, activation, float(clip))
    with distributed.process_group(dist, torch.device("cpu")):
        weights, losses = train_steps(cfg, dist)
    if dist.chief:
        torch.save({"model": weights, "losses": losses}, out)


__all__ = ["SINGLE", "STEPS", "fixed_batch", "main", "step_config", "train_steps"]

if __name__ == "__main__":
    main(*sys.argv[1:5])
