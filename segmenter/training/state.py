"""What ``last.pt`` restores: the loop's counters, the selection state and the history.

:class:`TrainState` is written into every checkpoint beside the model's and optimiser's
``state_dict`` (the checkpoint keys of :mod:`segmenter.nn.checkpoint`) and read back by
``--resume``, which then continues exactly: same step, elapsed budget, best checkpoint and
moving average, history rows and torch RNG state. What the network itself draws in a step
(dropout) does not depend on that state: :func:`seed_step` seeds it from the run's seed, the
rank and the step, so every data-parallel rank draws its own masks and a resumed run, on any
rank, draws the masks it would have drawn.

A checkpoint saved inside an epoch (a stop request after an optimiser step,
:mod:`segmenter.interrupts`) also holds that epoch's :class:`EpochProgress`: the steps done and
their losses. ``--resume`` re-creates the epoch's loader, which is seeded by the epoch, skips the
batches those steps used and carries on, so the epoch's row and the weights come out as without
the stop. A checkpoint without the key (an epoch boundary, or an older run) has none.
"""

from __future__ import annotations

import csv
import io as _stdio
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segmenter.config import Config, config_to_dict
from segmenter.planning.run_plan import RunPlan

#: Columns of ``metrics.csv``, one row per epoch.
HISTORY_KEYS = (
    "epoch", "step", "lr", "train_loss", "val_dice", "val_lesion_recall",
    "val_lesion_precision", "val_lesion_f1", "val_ema", "epoch_s", "data_wait_s", "elapsed_s",
)  # fmt: skip
#: Weight of the previous value in the moving average that selects ``best.pt`` (as nnU-Net
#: smooths its pseudo-Dice), so one lucky validation on few cases does not pick it.
EMA_WEIGHT = 0.5


@dataclass
class EpochProgress:
    """How far the unfinished epoch got (all zero at an epoch boundary).

    Attributes:
        steps: optimiser steps of the epoch done (all of them when it stopped before validating).
        losses: their training losses (the epoch's ``train_loss`` is their mean).
        lr: the learning rate of the last of them (the epoch's ``lr``).
        seconds: wall-clock seconds they took (the epoch's ``epoch_s``).
        wait_s: seconds of that spent waiting for batches (``data_wait_s``).
    """

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    lr: float = 0.0
    seconds: float = 0.0
    wait_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain types for the checkpoint."""
        return {
            "steps": self.steps,
            "losses": [float(v) for v in self.losses],
            "lr": float(self.lr),
            "seconds": float(self.seconds),
            "wait_s": float(self.wait_s),
        }

    @classmethod
    def from_json(cls, values: dict[str, Any] | None) -> EpochProgress:
        """The progress :meth:`to_json` wrote; None (no key: an epoch boundary) gives none."""
        if values is None:
            return cls()
        return cls(
            steps=int(values["steps"]),
            losses=[float(v) for v in values["losses"]],
            lr=float(values["lr"]),
            seconds=float(values["seconds"]),
            wait_s=float(values["wait_s"]),
        )


@dataclass
class TrainState:
    """The training loop's state: after a finished epoch, or inside one (``progress``).

    Attributes:
        epoch: epochs done.
        step: optimiser steps done (those of the unfinished epoch included).
        elapsed_s: wall-clock seconds of training so far (over resumes).
        best_metric: best moving average of the selection metric (-inf before any).
        best_epoch: the epoch ``best.pt`` holds (-1 before any).
        history: one ``metrics.csv`` row per epoch done.
        progress: the unfinished epoch ``epoch + 1``'s steps so far.
    """

    epoch: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    best_metric: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    progress: EpochProgress = field(default_factory=EpochProgress)

    def end_epoch(self, row: dict[str, float]) -> None:
        """Count the unfinished epoch, whose ``metrics.csv`` row is ``row``, as done."""
        self.epoch += 1
        self.progress = EpochProgress()
        self.history.append(row)

    @property
    def ema(self) -> float | None:
        """The selection metric's moving average after the last validation, or None."""
        return next((h["val_ema"] for h in reversed(self.history) if "val_ema" in h), None)

    def checkpoint(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        plan: RunPlan,
        *,
        world_size: int = 1,
    ) -> dict[str, Any]:
        """The checkpoint payload (plain types; see :mod:`segmenter.nn.checkpoint`);
        ``world_size``: the processes training together (``--resume`` needs as many)."""
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"kind": cfg.train.scheduler, "elapsed_s": float(self.elapsed_s)},
            "epoch": self.epoch,
            "step": self.step,
            "best_metric": float(self.best_metric),
            "best_epoch": self.best_epoch,
            "history": self.history,
            "config": config_to_dict(cfg),
            "plan": plan.to_json(),
            "rng": {"torch": torch.get_rng_state()},
            "epoch_progress": self.progress.to_json(),
            "world_size": int(world_size),
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> TrainState:
        """The state a checkpoint holds (the model, optimiser and RNG are restored apart)."""
        return cls(
            epoch=int(state["epoch"]),
            step=int(state["step"]),
            elapsed_s=float(state["scheduler"]["elapsed_s"]),
            best_metric=float(state["best_metric"]),
            best_epoch=int(state["best_epoch"]),
            history=[dict(h) for h in state["history"]],
            progress=EpochProgress.from_json(state.get("epoch_progress")),
        )


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's global generators (the CPU's and CUDA's, which dropout draws from) for
    optimiser step ``step`` (counted over the run) on data-parallel rank ``rank``."""
    mixed = np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(1, np.uint64)[0]
    torch.manual_seed(int(mixed))


def moving_average(previous: float | None, value: float) -> float | None:
    """Moving average of the selection metric; NaN validations leave it unchanged."""
    if math.isnan(value):
        return previous
    return value if previous is None else EMA_WEIGHT * previous + (1.0 - EMA_WEIGHT) * value


def history_csv(history: list[dict[str, float]]) -> str:
    """``metrics.csv``: :data:`HISTORY_KEYS` columns, empty cells for missing or NaN."""
    buf = _stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_KEYS), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if _missing(row.get(k)) else row.get(k)) for k in HISTORY_KEYS})
    return buf.getvalue()


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


__all__ = [
    "EMA_WEIGHT",
    "HISTORY_KEYS",
    "EpochProgress",
    "TrainState",
    "history_csv",
    "moving_average",
]
