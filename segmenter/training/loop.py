"""Training: ``fit(cfg, run_dir)`` as a few plain functions.

One run trains one fold:

- **set-up**: preprocess the cases (through the cache), split them, write the run plan;
  build the model, loss and optimiser;
- **restore** (``--resume``): the :class:`~segmenter.training.state.TrainState` of ``last.pt``,
  the weights, the optimiser and the RNG, so the run continues exactly (the loader is seeded
  per epoch, so the patches are the same too);
- **epoch**: a fixed number of optimiser steps on random patches (foreground-oversampled,
  augmented; :mod:`segmenter.training.sampling`), the learning rate following
  :mod:`segmenter.training.schedule`;
- **validate and select** every ``val_every`` epochs: the held-out cases predicted whole and
  scored with lesion recall, lesion F1 and voxel Dice (:mod:`segmenter.training.validation`);
  ``best.pt`` follows a moving average of ``train.best_metric``;
- **end of epoch**: ``last.pt``, ``metrics.csv`` and the curves; a wall-clock budget
  (``train.max_minutes``) ends training at an epoch boundary, after a last validation, and the
  schedule then runs on the budget's clock so it still decays to zero;
- **finish**: the threshold tuned on the best checkpoint's validation output.

Run folder: ``config.yaml`` (resolved), ``splits.json``, ``plan.json``,
``checkpoints/{best,last}.pt``, ``metrics.csv`` (one row per epoch), ``summary.json`` and
``lesions.csv`` (validation of the best checkpoint, ``segmenter evaluate``'s format),
``train.log``, ``training_curves.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmenter import plots
from segmenter.atomic import write_text
from segmenter.config import ChannelNormalization, Config, save_config
from segmenter.data.layout import Dataset, load_dataset
from segmenter.data.splits import make_splits, resolve_dataset
from segmenter.errors import InputError
from segmenter.evaluation import report
from segmenter.inference.predictor import build_from_plan
from segmenter.locking import FolderLock
from segmenter.nn.checkpoint import load_checkpoint, save_checkpoint
from segmenter.nn.losses import build_loss
from segmenter.nn.network import build_model
from segmenter.nn.runtime import autocast, autocast_dtype, resolve_device
from segmenter.planning.memory import TrainingJob, check_training
from segmenter.planning.run_plan import RunPlan
from segmenter.preprocessing.case import PreprocessedCase
from segmenter.preprocessing.pipeline import preprocess_dataset
from segmenter.preprocessing.spec import PreprocessingSpec
from segmenter.training import validation
from segmenter.training.sampling import make_loader
from segmenter.training.schedule import build_optimizer, lr_factor
from segmenter.training.state import TrainState, history_csv, moving_average

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """What a finished training run reports."""

    run_dir: Path
    epochs: int
    steps: int
    best_epoch: int
    best_metric: float
    stopped_by_budget: bool
    seconds: float
    data_wait_fraction: float


# ------------------------------------------------------------------------------ run plan


def build_run_plan(
    dataset: Dataset, cfg: Config, cases: Sequence[PreprocessedCase], fold: int | str
) -> RunPlan:
    """What predict must repeat: channels, labels, patch, preprocessing, output channels."""
    names = tuple(str(dataset.channel_names[i]) for i in sorted(dataset.channel_names))
    schemes = cfg.data.normalization or tuple(ChannelNormalization() for _ in names)
    normalization = tuple(
        replace(n, channel=n.channel or name) for name, n in zip(names, schemes, strict=False)
    )
    spacings = np.array([c.spacing for c in cases], dtype=np.float64)
    return RunPlan(
        dataset=dataset.name,
        channel_names=names,
        labels=dict(dataset.labels),
        file_ending=dataset.file_ending,
        activation=cfg.loss.activation,
        out_channels=1 if cfg.loss.activation == "sigmoid" else 2,
        patch_size=(cfg.data.patch_size[0], cfg.data.patch_size[1], cfg.data.patch_size[2]),
        preprocessing=replace(PreprocessingSpec.from_data(cfg.data), normalization=normalization),
        median_spacing=tuple(float(v) for v in np.median(spacings, axis=0)),
        threshold=cfg.inference.threshold,
        min_lesion_mm3=cfg.inference.min_lesion_mm3,
        fold=fold,
    )


def write_run_plan(plan: RunPlan, run: Path) -> None:
    """``RUN/plan.json`` (strict JSON: a tuning row's undefined precision is null)."""
    write_text(run / "plan.json", report.summary_json(plan.to_json()))


# --------------------------------------------------------------------------------- set-up


@dataclass
class _Session:
    """What set-up builds: fixed for the whole run (the plan gains its tuned threshold)."""

    cfg: Config
    run: Path
    device: torch.device
    dtype: torch.dtype | None
    plan: RunPlan
    train_cases: list[PreprocessedCase]
    val_cases: list[PreprocessedCase]
    model: Any
    step: TrainStep

    def save(self, name: str, state: TrainState) -> None:
        """``checkpoints/{name}.pt`` holding ``state`` and the current weights."""
        payload = state.checkpoint(self.model, self.step.optimizer, self.cfg, self.plan)
        save_checkpoint(self.run / "checkpoints" / f"{name}.pt", payload)


def _training_dataset(cfg: Config, fold: int | str) -> Dataset:
    """Load the dataset and check the fold before anything is written (fails in milliseconds)."""
    root = resolve_dataset(cfg)
    dataset = load_dataset(root)
    if not dataset.training:
        raise InputError(f"{root}: no training cases")
    if fold != "all":
        if not 0 <= int(fold) < cfg.train.n_folds:
            raise InputError(f"--fold {fold} out of range 0..{cfg.train.n_folds - 1}")
        if len(dataset.training) < cfg.train.n_folds:
            raise InputError(
                f"{root}: {len(dataset.training)} training cases, fewer than train.n_folds="
                f"{cfg.train.n_folds}; lower train.n_folds"
            )
    return dataset


def _training_job(cfg: Config, dataset: Dataset, fold: int | str) -> TrainingJob:
    """What the memory estimate needs of a run: its config, fold, device and the network's
    parameter count (the network built on the meta device: no memory, no random draw)."""
    out_channels = 1 if cfg.loss.activation == "sigmoid" else 2
    p = cfg.data.patch_size
    target = cfg.data.target_spacing
    with torch.device("meta"):
        model = build_model(
            cfg.model, dataset.n_channels, out_channels, patch_size=(p[0], p[1], p[2]),
            spacing=None if target is None else (target[0], target[1], target[2]),
        )  # fmt: skip
    return TrainingJob(
        cfg=cfg, fold=fold, parameters=sum(t.numel() for t in model.parameters()),
        out_channels=out_channels, on_accelerator=resolve_device(cfg.train.device).type != "cpu",
    )  # fmt: skip


def _split_cases(
    cfg: Config, cases: list[PreprocessedCase], fold: int | str
) -> tuple[list[dict[str, list[str]]], list[PreprocessedCase], list[PreprocessedCase]]:
    """All folds' splits and this fold's training and validation cases."""
    ids = [c.case_id for c in cases]
    if fold == "all":
        splits = [{"train": sorted(ids), "val": sorted(ids)}]
        split = splits[0]
    else:
        burdens = [float((c.label > 0).mean()) if c.label is not None else 0.0 for c in cases]
        splits = make_splits(ids, burdens, cfg.train.n_folds, cfg.train.seed)
        split = splits[int(fold)]
    by_id = {c.case_id: c for c in cases}
    return splits, [by_id[c] for c in split["train"]], [by_id[c] for c in split["val"]]


def _set_up(
    cfg: Config, dataset: Dataset, run: Path, *, fold: int | str, progress: bool
) -> _Session:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    dtype = autocast_dtype(t.precision, device)
    if device.type == "cpu":
        tune_allocator()
    save_config(cfg, run / "config.yaml")
    cases = preprocess_dataset(
        dataset.training, PreprocessingSpec.from_data(cfg.data),
        cache_dir=cfg.data.cache_dir or None, workers=2, progress=progress,
    )  # fmt: skip
    splits, train_cases, val_cases = _split_cases(cfg, cases, fold)
    plan = build_run_plan(dataset, cfg, cases, fold)
    write_text(run / "splits.json", json.dumps(splits, indent=2))
    write_run_plan(plan, run)
    log.info(
        "fold %s: %d training, %d validation cases; device %s, autocast %s",
        fold, len(train_cases), len(val_cases), device, dtype,
    )  # fmt: skip
    torch.manual_seed(t.seed)
    model = build_from_plan(cfg, plan).place(device)
    return _Session(
        cfg=cfg, run=run, device=device, dtype=dtype, plan=plan, train_cases=train_cases,
        val_cases=val_cases, model=model,
        step=TrainStep(
            cfg=cfg, model=model, loss_fn=build_loss(cfg.loss),
            optimizer=build_optimizer(t, model), device=device, dtype=dtype,
            scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
        ),
    )  # fmt: skip


def _restore(session: _Session) -> TrainState:
    """The state of ``last.pt``, its weights, optimiser and RNG loaded into the session."""
    ckpt = load_checkpoint(session.run / "checkpoints" / "last.pt", map_location=session.device)
    session.model.load_state_dict(ckpt["model"])
    session.step.optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state = TrainState.from_checkpoint(ckpt)
    log.info("resumed from epoch %d, step %d", state.epoch, state.step)
    return state


# ---------------------------------------------------------------------------------- epochs


@dataclass
class _Clock:
    """Wall-clock bookkeeping: the budget, the seconds spent waiting for data and validating."""

    started: float
    budget: float | None
    first_step: int
    session_start: float = field(default_factory=time.perf_counter)
    val_seconds: float = 0.0
    wait_total: float = 0.0
    step_total: float = 0.0

    @classmethod
    def start(cls, cfg: Config, state: TrainState) -> _Clock:
        budget = cfg.train.max_minutes * 60.0 if cfg.train.max_minutes else None
        return cls(time.perf_counter() - state.elapsed_s, budget, state.step)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def time_progress(self) -> float:
        return self.elapsed() / self.budget if self.budget else 0.0

    def over_budget_after(self, epoch_s: float) -> bool:
        """Whether another epoch and validation would pass the budget."""
        return self.budget is not None and self.elapsed() + epoch_s + self.val_seconds > self.budget


def _epoch_batches(session: _Session, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """The epoch's batches. One loader per epoch, seeded by the epoch number (what makes
    --resume exact); its iterator starts the workers at once, so the next epoch's is made one
    epoch early and its first batches are ready when that epoch starts."""
    cfg = session.cfg
    seed = cfg.train.seed * 100_003 + epoch
    return iter(make_loader(session.train_cases, cfg.data, cfg.augment, seed=seed))


def _train_epoch(
    session: _Session,
    state: TrainState,
    batches: Iterator[dict[str, torch.Tensor]],
    clock: _Clock,
    *,
    bar: Any,
) -> dict[str, float]:
    """One epoch of optimiser steps; ``state.step`` and ``state.epoch`` advance. Returns the
    epoch's ``metrics.csv`` row so far."""
    t = session.cfg.train
    total_steps = t.epochs * t.iterations_per_epoch
    epoch_start = time.perf_counter()
    losses, wait, lr = [], 0.0, t.lr
    for _ in range(t.iterations_per_epoch):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        progress = max(state.step / total_steps, clock.time_progress())
        lr = t.lr * lr_factor(t, progress, state.step, t.warmup_epochs * t.iterations_per_epoch)
        for group in session.step.optimizer.param_groups:
            group["lr"] = lr
        loss = session.step(batch)
        losses.append(loss)
        state.step += 1
        if bar is not None:
            bar.update(1)
            best = state.best_metric if math.isfinite(state.best_metric) else None
            bar.set_postfix(loss=f"{loss:.4f}", f1=report.format_metric(best), refresh=False)
    state.epoch += 1
    epoch_s = time.perf_counter() - epoch_start
    clock.wait_total += wait
    clock.step_total += epoch_s
    return {
        "epoch": state.epoch, "step": state.step, "lr": lr,
        "train_loss": float(np.mean(losses)), "epoch_s": epoch_s, "data_wait_s": wait,
    }  # fmt: skip


def _validate_and_select(
    session: _Session, state: TrainState, row: dict[str, float], clock: _Clock
) -> list[np.ndarray] | None:
    """Validate, add the scores and their moving average to ``row``, and save ``best.pt``
    (and the validation report) when the average improved. Returns the validation
    probabilities when they became the best, else None."""
    cfg = session.cfg
    v0 = time.perf_counter()
    probs = validation.validation_probabilities(
        session.model, session.val_cases, cfg, session.plan, device=session.device,
        dtype=session.dtype,
    )  # fmt: skip
    summary, results = validation.score_cases(session.val_cases, probs, cfg)
    clock.val_seconds = time.perf_counter() - v0
    row.update(validation.validation_scores(summary))
    row["val_ema"] = moving_average(state.ema, row[validation.BEST_KEYS[cfg.train.best_metric]])
    log.info(
        "epoch %d: loss %.4f, val Dice %.3f, lesion recall %.3f, precision %.3f, F1 %.3f",
        state.epoch, row["train_loss"], row["val_dice"], row["val_lesion_recall"],
        row["val_lesion_precision"], row["val_lesion_f1"],
    )  # fmt: skip
    value = row["val_ema"] if row["val_ema"] is not None else math.nan
    if math.isnan(value) or not value > state.best_metric:
        return None
    state.best_metric, state.best_epoch = value, state.epoch
    best = replace(state, elapsed_s=clock.elapsed(), history=[*state.history, row])
    session.save("best", best)
    report.write_report(results, summary, session.run)
    return probs


def _end_epoch(session: _Session, state: TrainState, row: dict[str, float], clock: _Clock) -> None:
    """Append the row; write ``last.pt``, ``metrics.csv`` and the curves."""
    row["elapsed_s"] = clock.elapsed()
    state.history.append(row)
    state.elapsed_s = row["elapsed_s"]
    session.save("last", state)
    write_text(session.run / "metrics.csv", history_csv(state.history))
    plots.run_curves(state.history, session.run / "training_curves.png")


def _update_eta(bar: Any, state: TrainState, clock: _Clock, total_steps: int) -> None:
    """Under a budget the bar's total follows the steps the remaining time allows."""
    if bar is None or clock.budget is None:
        return
    seconds_per_step = (time.perf_counter() - clock.session_start) / max(
        state.step - clock.first_step, 1
    )
    steps_left = max(clock.budget - clock.elapsed(), 0.0) / seconds_per_step
    bar.total = min(total_steps, state.step + int(steps_left))
    bar.refresh()


# ---------------------------------------------------------------------------------- the loop


def fit(
    cfg: Config,
    run_dir: str | Path,
    *,
    fold: int | str = 0,
    resume: bool = False,
    progress: bool = True,
    should_stop: Callable[[int], bool] | None = None,
) -> FitResult:
    """Train one fold of ``cfg`` into ``run_dir`` (see the module docstring).

    Args:
        cfg: the resolved experiment config.
        run_dir: run folder (created; must not hold a run unless ``resume``).
        fold: cross-validation fold number, or ``"all"`` (train and validate on every case).
        resume: continue from ``run_dir/checkpoints/last.pt``.
        progress: draw a progress bar on stderr.
        should_stop: called with the number of finished epochs after each epoch's checkpoint
            is saved; True ends the run there (it can be resumed later), e.g. from a notebook.

    Raises:
        InputError: bad dataset, fold or resume state, or a run whose estimated memory
            (:func:`segmenter.planning.memory.check_training`, from the headers, before
            anything is read or written) exceeds what is available.
    """
    run = Path(run_dir)
    last_path = run / "checkpoints" / "last.pt"
    if resume and not last_path.is_file():
        raise InputError(f"{run}: nothing to resume (no checkpoints/last.pt)")
    if not resume and last_path.exists():
        raise InputError(f"{run}: already holds a trained run (use --resume or another --out)")
    dataset = _training_dataset(cfg, fold)
    check_training(dataset, _training_job(cfg, dataset, fold))
    with FolderLock(run, "train"):
        handler = logging.FileHandler(run / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        pkg_log = logging.getLogger("segmenter")
        pkg_log.addHandler(handler)
        try:
            session = _set_up(cfg, dataset, run, fold=fold, progress=progress)
            state = _restore(session) if resume else TrainState()
            return _train(session, state, progress=progress, should_stop=should_stop)
        finally:
            pkg_log.removeHandler(handler)
            handler.close()


def _train(
    session: _Session,
    state: TrainState,
    *,
    progress: bool,
    should_stop: Callable[[int], bool] | None,
) -> FitResult:
    t = session.cfg.train
    total_steps = t.epochs * t.iterations_per_epoch
    clock = _Clock.start(session.cfg, state)
    bar = _bar(progress, total_steps, state.step)
    best_probs: list[np.ndarray] | None = None  # validation probabilities of best.pt
    stopped_by_budget = False
    session.model.train()
    upcoming = _epoch_batches(session, state.epoch) if state.epoch < t.epochs else None
    while state.epoch < t.epochs:
        assert upcoming is not None
        batches = upcoming
        upcoming = _epoch_batches(session, state.epoch + 1) if state.epoch + 1 < t.epochs else None
        row = _train_epoch(session, state, batches, clock, bar=bar)
        del batches
        stop_now = clock.over_budget_after(row["epoch_s"])
        _update_eta(bar, state, clock, total_steps)
        if state.epoch % t.val_every == 0 or state.epoch == t.epochs or stop_now:
            best_probs = _validate_and_select(session, state, row, clock) or best_probs
        else:
            log.info("epoch %d: loss %.4f", state.epoch, row["train_loss"])
        _end_epoch(session, state, row, clock)
        if stop_now and state.epoch < t.epochs:
            stopped_by_budget = True
            log.info("wall-clock budget of %.1f min reached after epoch %d", t.max_minutes,
                     state.epoch)  # fmt: skip
            break
        if should_stop is not None and should_stop(state.epoch):
            log.info("stopped on request after epoch %d", state.epoch)
            break
    del upcoming  # an unused next-epoch loader: stop its workers
    if bar is not None:
        bar.close()
    _finish(session, state, best_probs)
    seconds = clock.elapsed()
    wait_fraction = clock.wait_total / clock.step_total if clock.step_total else 0.0
    log.info(
        "done: %d epochs, best %s %.4f at epoch %d, %.1f s; the step waited for data %.1f%% "
        "of the training time",
        state.epoch, t.best_metric, state.best_metric, state.best_epoch, seconds,
        100 * wait_fraction,
    )  # fmt: skip
    return FitResult(
        run_dir=session.run, epochs=state.epoch, steps=state.step, best_epoch=state.best_epoch,
        best_metric=state.best_metric, stopped_by_budget=stopped_by_budget, seconds=seconds,
        data_wait_fraction=wait_fraction,
    )  # fmt: skip


def _finish(session: _Session, state: TrainState, best_probs: list[np.ndarray] | None) -> None:
    """``best.pt`` exists; predict's default threshold tuned on it when asked."""
    checkpoints = session.run / "checkpoints"
    if state.best_epoch < 0:  # no validation ever scored (e.g. no lesions anywhere): keep last
        save_checkpoint(checkpoints / "best.pt", load_checkpoint(checkpoints / "last.pt"))
    if not (session.cfg.train.tune_threshold and session.val_cases and state.best_epoch >= 0):
        return
    best = load_checkpoint(checkpoints / "best.pt", map_location=session.device)
    if best_probs is None:  # after a resume: recompute them from best.pt
        session.model.load_state_dict(best["model"])
        best_probs = validation.validation_probabilities(
            session.model, session.val_cases, session.cfg, session.plan, device=session.device,
            dtype=session.dtype,
        )  # fmt: skip
    session.plan = validation.plan_with_tuned_threshold(
        session.plan, session.val_cases, best_probs, session.cfg
    )
    for name in ("best", "last"):
        ckpt = best if name == "best" else load_checkpoint(checkpoints / f"{name}.pt")
        save_checkpoint(checkpoints / f"{name}.pt", {**ckpt, "plan": session.plan.to_json()})
    write_run_plan(session.plan, session.run)


# ------------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class TrainStep:
    """One optimiser step on a batch (call it with the batch; returns the loss).

    Attributes:
        cfg: supplies the activation (softmax targets get a background channel) and
            ``train.grad_clip``.
        model: the network, in train mode, returning logits (a list under deep supervision).
        loss_fn: logits-first loss.
        optimizer: the optimiser.
        device: where the batch goes.
        dtype: autocast dtype, or None for float32.
        scaler: a GradScaler for fp16 autocast, else None.
    """

    cfg: Config
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        """Args: ``batch``: ``image`` ``(B, C, X, Y, Z)`` float, ``label`` ``(B, 1, X, Y, Z)``
        in {0, 1}."""
        optimizer, scaler = self.optimizer, self.scaler
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        if self.cfg.loss.activation == "softmax":
            y = torch.cat([1.0 - y, y], dim=1)
        optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.dtype):
            out = self.model(x)
        out = [o.float() for o in out] if isinstance(out, list | tuple) else out.float()
        loss = self.loss_fn(out, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return float(loss.detach())


def tune_allocator() -> bool:
    """Keep freed large buffers in the process (glibc only): without it every training step
    returns its activations to the OS and faults them back in, which cost about 20 % of a CPU
    step here (48^3 patches, batch 2). Process-wide, so it is called when training starts, never
    at import. Returns whether it applied."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        return bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok)
    except (OSError, AttributeError):
        return False


def _bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr)


__all__ = ["FitResult", "TrainStep", "build_run_plan", "fit", "tune_allocator", "write_run_plan"]
