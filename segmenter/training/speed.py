"""How fast this machine trains a config's network: seconds per optimiser step, measured.

A budget-aware plan (``segmenter plan --minutes M``) needs the step time of each candidate
network on the machine it will train on: the same step (:class:`~segmenter.training.loop.
TrainStep`: forward, loss, backward, clipping, AdamW) on a random batch of the config's patch,
batch size, channels, precision and threads. Data loading and validation are not in it (the
loader waits for data 1-2 % of the training time, ``train.log`` says how much).

The measurement draws its random batch from its own generator and builds the network inside
:func:`torch.random.fork_rng`, so it leaves the global random state as it found it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from segmenter.config import Config, apply_values
from segmenter.nn.losses import build_loss
from segmenter.nn.network import build_model
from segmenter.nn.runtime import autocast_dtype, resolve_device
from segmenter.planning.planner import steps_in_budget
from segmenter.training.loop import TrainStep, tune_allocator
from segmenter.training.schedule import build_optimizer

#: Share of positive voxels in the random label (a lesion-like class imbalance).
LABEL_FRACTION = 0.02


@dataclass(frozen=True)
class StepTiming:
    """Measured step time of one network.

    Attributes:
        base_filters: the network's full-resolution width.
        seconds_per_step: median over the timed steps.
        timed_steps: how many steps the median is over (after the warm-up).
    """

    base_filters: int
    seconds_per_step: float
    timed_steps: int


def _synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously), so a timer sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(
    cfg: Config, in_channels: int, *, steps: int = 3, warmup: int = 1, seed: int = 0
) -> StepTiming:
    """Median seconds of ``steps`` training steps of ``cfg``'s network after ``warmup`` steps.

    Args:
        cfg: network (``model``), patch and batch (``data``), loss, optimiser, precision,
            device and threads (``train``).
        in_channels: input channels (MRI sequences).
        steps: timed steps (>= 1).
        warmup: untimed steps first (oneDNN picks its kernels on the first one).
        seed: seeds the random batch and the weights.
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    if device.type == "cpu":
        tune_allocator()
    dtype = autocast_dtype(t.precision, device)
    out_channels = 1 if cfg.loss.activation == "sigmoid" else 2
    p = cfg.data.patch_size
    spacing = cfg.data.target_spacing
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.data.batch_size, in_channels, p[0], p[1], p[2])
    batch = {
        "image": torch.randn(shape, generator=generator),
        "label": (torch.rand((shape[0], 1, *shape[2:]), generator=generator) < LABEL_FRACTION)
        .float(),
    }  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(
            cfg.model, in_channels, out_channels, patch_size=(p[0], p[1], p[2]),
            spacing=None if spacing is None else (spacing[0], spacing[1], spacing[2]),
        ).place(device)  # fmt: skip
        model.train()
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        step = TrainStep(
            cfg=cfg, model=model, loss_fn=build_loss(cfg.loss),
            optimizer=build_optimizer(t, model), device=device, dtype=dtype, scaler=scaler,
        )  # fmt: skip
        for _ in range(warmup):
            step(batch)
        seconds = []
        for _ in range(max(steps, 1)):
            _synchronize(device)
            start = time.perf_counter()
            step(batch)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
    return StepTiming(cfg.model.base_filters, statistics.median(seconds), len(seconds))


def time_widths(
    cfg: Config,
    in_channels: int,
    *,
    on_timing: Callable[[StepTiming], None] | None = None,
) -> list[StepTiming]:
    """Step times of ``plan.widths`` (narrowest first) with the rest of ``cfg`` as it is.

    A width is timed only while the narrower ones still train ``plan.min_steps`` steps in
    ``plan.minutes`` (a wider network is slower, so it could not either): on a slow machine the
    wide networks cost no time to rule out.

    Raises:
        ValueError: ``plan.minutes`` is not set.
    """
    plan = cfg.plan
    if plan.minutes is None:
        raise ValueError("time_widths needs plan.minutes")
    timings = []
    for width in sorted(set(plan.widths)):
        widest = max(cfg.model.max_filters, width)
        values = {"model.base_filters": width, "model.max_filters": widest}
        timing = measure_step(apply_values(cfg, values), in_channels)
        timings.append(timing)
        if on_timing is not None:
            on_timing(timing)
        if steps_in_budget(timing.seconds_per_step, plan.minutes, plan.overhead) < plan.min_steps:
            break
    return timings


__all__ = ["LABEL_FRACTION", "StepTiming", "measure_step", "time_widths"]
