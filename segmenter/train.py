"""Training: ``fit(cfg, run_dir)`` as a few plain functions.

One run trains one fold. Each epoch is a fixed number of optimiser steps on random patches
(foreground-oversampled, augmented; :mod:`segmenter.sampling`); every ``val_every`` epochs the
model predicts the held-out cases whole with the sliding window and is scored with lesion recall,
lesion F1 and voxel Dice (not a patch pseudo-Dice); the best checkpoint is chosen by
``train.best_metric``. A wall-clock budget (``train.max_minutes``) ends training at an epoch
boundary, after a last validation, and the learning-rate schedule then runs on the budget's
clock so it still decays to zero. ``--resume`` continues from ``last.pt`` exactly: same step,
learning rate, optimiser state and the same patches (the loader is seeded per epoch).

Run folder: ``config.yaml`` (resolved), ``splits.json``, ``plan.json``,
``checkpoints/{best,last}.pt``, ``metrics.csv`` (one row per epoch), ``summary.json`` and
``lesions.csv`` (validation of the best checkpoint, ``segmenter evaluate``'s format),
``train.log``, ``training_curves.png``.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmenter import metrics, report, tuning
from segmenter.atomic import atomic_path, write_text
from segmenter.checkpoint import load_checkpoint, save_checkpoint
from segmenter.config import ChannelNormalization, Config, config_to_dict, save_config
from segmenter.data import Dataset, load_dataset
from segmenter.errors import InputError
from segmenter.inference import (
    autocast,
    autocast_dtype,
    build_from_plan,
    foreground_probability,
    predict_logits,
    resolve_device,
)
from segmenter.losses import build_loss
from segmenter.postprocess import probabilities_to_mask
from segmenter.preprocess import PreprocessedCase, preprocess_dataset
from segmenter.sampling import make_loader

log = logging.getLogger(__name__)

HISTORY_KEYS = (
    "epoch", "step", "lr", "train_loss", "val_dice", "val_lesion_recall",
    "val_lesion_precision", "val_lesion_f1", "val_ema", "epoch_s", "data_wait_s", "elapsed_s",
)  # fmt: skip
# best.pt follows an exponential moving average of the validation metric over validations (as
# nnU-Net smooths its pseudo-Dice), so one lucky validation on few cases does not pick it.
EMA_WEIGHT = 0.5
BEST_KEYS = {"lesion_f1": "val_lesion_f1", "dice": "val_dice", "lesion_recall": "val_lesion_recall"}


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


def resolve_dataset(cfg: Config, cwd: Path | None = None) -> Path:
    """The dataset folder of ``cfg`` (a relative path is taken from the working directory)."""
    if not cfg.data.dataset:
        raise InputError("data.dataset is not set (give it in the config or with --set)")
    path = Path(cfg.data.dataset).expanduser()
    return path if path.is_absolute() else (cwd or Path.cwd()) / path


def make_splits(
    case_ids: Sequence[str], burdens: Sequence[float], n_folds: int, seed: int
) -> list[dict[str, list[str]]]:
    """K-fold split stratified by lesion burden (nnU-Net's ``splits_final.json`` shape).

    Cases are sorted by burden (lesion-free first, ties shuffled with ``seed``) and dealt to the
    folds in turn, so every fold gets lesion-free, light and heavy cases alike.
    """
    if len(case_ids) < n_folds:
        raise InputError(
            f"the dataset has {len(case_ids)} training cases, fewer than train.n_folds="
            f"{n_folds}; lower train.n_folds"
        )
    rng = np.random.default_rng(seed)
    jitter = rng.random(len(case_ids))
    order = sorted(range(len(case_ids)), key=lambda i: (burdens[i], jitter[i]))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    start = int(rng.integers(n_folds))
    for rank, i in enumerate(order):
        folds[(start + rank) % n_folds].append(case_ids[i])
    return [
        {
            "train": sorted(c for j, f in enumerate(folds) if j != k for c in f),
            "val": sorted(folds[k]),
        }
        for k in range(n_folds)
    ]


def _normalization_record(dataset: Dataset, cfg: Config) -> list[dict[str, Any]]:
    """Each channel's normalisation as predict must repeat it (``data.normalization``)."""
    names = [dataset.channel_names[i] for i in sorted(dataset.channel_names)]
    schemes = cfg.data.normalization or tuple(ChannelNormalization() for _ in names)
    return [
        {**config_to_dict(n), "channel": n.channel or str(name)}
        for name, n in zip(names, schemes, strict=False)
    ]


def build_plan(dataset: Dataset, cfg: Config, cases: Sequence[PreprocessedCase]) -> dict[str, Any]:
    """What predict must repeat: channels, labels, patch, normalisation, output channels."""
    spacings = np.array([c.spacing for c in cases], dtype=np.float64)
    return {
        "dataset": dataset.name,
        "channel_names": [dataset.channel_names[i] for i in sorted(dataset.channel_names)],
        "labels": dict(dataset.labels),
        "file_ending": dataset.file_ending,
        "activation": cfg.loss.activation,
        "out_channels": 1 if cfg.loss.activation == "sigmoid" else 2,
        "foreground": "all labels > 0 are one lesion class",
        "patch_size": list(cfg.data.patch_size),
        "normalization": _normalization_record(dataset, cfg),
        "crop_to_nonzero": cfg.data.crop_to_nonzero,
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "clip_percentiles": (
            None
            if cfg.data.clip_percentiles is None
            else [float(v) for v in cfg.data.clip_percentiles]
        ),
        "target_spacing": (
            None if cfg.data.target_spacing is None else [float(v) for v in cfg.data.target_spacing]
        ),
        "threshold": cfg.inference.threshold,
        "min_lesion_mm3": cfg.inference.min_lesion_mm3,
    }


def _lr_factor(cfg: Config, progress: float, step: int, warmup_steps: int) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if cfg.train.scheduler == "poly":
        return (1.0 - p) ** 0.9
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True,
            weight_decay=t.weight_decay,
        )  # fmt: skip
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def validate(
    model: torch.nn.Module,
    cases: Sequence[PreprocessedCase],
    cfg: Config,
    plan: dict[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[dict[str, Any], list[report.CaseResult], list[np.ndarray]]:
    """Predict held-out cases whole (sliding window, no TTA) and score them.

    Returns:
        The ``summary.json`` structure, the per-case results and the foreground probability
        maps (cropped grids), which threshold tuning reuses for the best checkpoint.
    """
    rule = metrics.PRESETS[cfg.evaluation.preset]
    results = []
    probs = validation_probabilities(model, cases, cfg, plan, device=device, dtype=dtype)
    for case, prob in zip(cases, probs, strict=True):
        pred = probabilities_to_mask(
            prob, case.spacing, threshold=cfg.inference.threshold,
            min_lesion_mm3=cfg.inference.min_lesion_mm3,
        )  # fmt: skip
        ref = (case.label > 0).astype(np.uint8) if case.label is not None else np.zeros_like(pred)
        pair = report.CasePair(case.case_id, Path(f"validation/{case.case_id}"), Path(case.case_id))
        results.append(
            report.measure_case(
                pair, pred, ref, case.spacing, case.crop_affine, rule,
                cfg.evaluation.size_bins_mm3, labels=[1],
            )
        )  # fmt: skip
    return report.summarise(results, cfg.evaluation.preset, rule), results, probs


def validation_probabilities(
    model: torch.nn.Module,
    cases: Sequence[PreprocessedCase],
    cfg: Config,
    plan: dict[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[np.ndarray]:
    """Foreground probabilities ``(X, Y, Z)`` of whole preprocessed cases (no TTA)."""
    model.eval()
    probs = []
    for case in cases:
        logits = predict_logits(
            model, case.image, tuple(plan["patch_size"]), cfg.inference, device=device,
            dtype=dtype, tta=False,
        )  # fmt: skip
        probs.append(foreground_probability(logits, plan["activation"]))
    model.train()
    return probs


THRESHOLD_GRID = tuning.THRESHOLDS  # 0.10 .. 0.90


def tune_threshold(
    probabilities: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    spacings: Sequence[tuple[float, ...]],
    cfg: Config,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> tuple[float, list[dict[str, float]]]:
    """The threshold with the best mean of pooled lesion F1 and voxel Dice (ties: nearer 0.5),
    at the config's minimum lesion size (:func:`segmenter.tuning.grid_search`).

    Args:
        probabilities: per case ``(X, Y, Z)`` foreground probabilities.
        references: per case ``(X, Y, Z)`` binary references.
        spacings: voxel sizes in mm.
        cfg: supplies the lesion rule and minimum lesion size.
        grid: thresholds to try.

    Returns:
        The chosen threshold and one row per threshold (threshold, f1, recall, precision, dice,
        criterion, min_lesion_mm3).
    """
    best, rows = tuning.grid_search(
        probabilities, references, spacings, metrics.PRESETS[cfg.evaluation.preset],
        thresholds=grid, min_sizes_mm3=(cfg.inference.min_lesion_mm3,),
    )  # fmt: skip
    return float(best["threshold"]), rows


def _ema(previous: float | None, value: float) -> float | None:
    """Moving average of the selection metric; NaN validations leave it unchanged."""
    if math.isnan(value):
        return previous
    return value if previous is None else EMA_WEIGHT * previous + (1.0 - EMA_WEIGHT) * value


def _score(summary: dict[str, Any]) -> dict[str, float]:
    pooled = summary["lesion"]["pooled"]
    return {
        "val_dice": float(summary["foreground_mean"]["Dice"]),
        "val_lesion_recall": float(pooled["recall"]),
        "val_lesion_precision": float(pooled["precision"]),
        "val_lesion_f1": float(pooled["f1"]),
    }


def _history_csv(history: list[dict[str, float]]) -> str:
    buf = _stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_KEYS), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if _isnan(row.get(k)) else row.get(k)) for k in HISTORY_KEYS})
    return buf.getvalue()


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Training loss and validation metrics per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    for key, label in (("val_dice", "Dice"), ("val_lesion_recall", "lesion recall"),
                       ("val_lesion_f1", "lesion F1")):  # fmt: skip
        pts = [(h["epoch"], h[key]) for h in history if not _isnan(h.get(key))]
        if pts:
            ax_val.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylim(0, 1)
    if ax_val.lines:
        ax_val.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


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


def _prepare(
    cfg: Config, dataset: Dataset, run: Path, fold: int | str, progress: bool
) -> tuple[dict[str, Any], list[PreprocessedCase], list[PreprocessedCase]]:
    cases = preprocess_dataset(
        dataset.training, crop_to_nonzero=cfg.data.crop_to_nonzero,
        target_spacing=cfg.data.target_spacing, clip_percentiles=cfg.data.clip_percentiles,
        normalization=cfg.data.normalization, cache_dir=cfg.data.cache_dir or None,
        workers=2, progress=progress,
    )  # fmt: skip
    ids = [c.case_id for c in cases]
    burdens = [float((c.label > 0).mean()) if c.label is not None else 0.0 for c in cases]
    if fold == "all":
        split = {"train": sorted(ids), "val": sorted(ids)}
        splits = [split]
    else:
        splits = make_splits(ids, burdens, cfg.train.n_folds, cfg.train.seed)
        split = splits[int(fold)]
    by_id = {c.case_id: c for c in cases}
    train_cases = [by_id[c] for c in split["train"]]
    val_cases = [by_id[c] for c in split["val"]]
    plan = build_plan(dataset, cfg, cases)
    plan["fold"] = fold
    write_text(run / "splits.json", json.dumps(splits, indent=2))
    write_text(run / "plan.json", json.dumps(plan, indent=2))
    return plan, train_cases, val_cases


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
        InputError: bad dataset, fold or resume state.
    """
    run = Path(run_dir)
    last_path = run / "checkpoints" / "last.pt"
    if resume and not last_path.is_file():
        raise InputError(f"{run}: nothing to resume (no checkpoints/last.pt)")
    if not resume and last_path.exists():
        raise InputError(f"{run}: already holds a trained run (use --resume or another --out)")
    dataset = _training_dataset(cfg, fold)
    run.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    pkg_log = logging.getLogger("segmenter")
    pkg_log.addHandler(handler)
    try:
        return _fit(cfg, dataset, run, fold, resume, progress, should_stop)
    finally:
        pkg_log.removeHandler(handler)
        handler.close()


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


def _fit(
    cfg: Config,
    dataset: Dataset,
    run: Path,
    fold: int | str,
    resume: bool,
    progress: bool,
    should_stop: Callable[[int], bool] | None,
) -> FitResult:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    dtype = autocast_dtype(t.precision, device)
    if device.type == "cpu":
        tune_allocator()
    save_config(cfg, run / "config.yaml")
    plan, train_cases, val_cases = _prepare(cfg, dataset, run, fold, progress)
    log.info(
        "fold %s: %d training, %d validation cases; device %s, autocast %s",
        fold, len(train_cases), len(val_cases), device, dtype,
    )  # fmt: skip

    torch.manual_seed(t.seed)
    model = build_from_plan(cfg, plan).place(device)
    loss_fn = build_loss(cfg.loss)
    optimizer = _optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    epoch, step, elapsed = 0, 0, 0.0
    best, best_epoch = -math.inf, -1
    history: list[dict[str, float]] = []
    ema: float | None = None
    best_probs: list[np.ndarray] | None = None  # validation probabilities of best.pt
    if resume:
        state = load_checkpoint(run / "checkpoints" / "last.pt", map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step = int(state["epoch"]), int(state["step"])
        elapsed = float(state["scheduler"]["elapsed_s"])
        best, best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        history = [dict(h) for h in state["history"]]
        ema = next((h["val_ema"] for h in reversed(history) if "val_ema" in h), None)
        torch.set_rng_state(state["rng"]["torch"])
        log.info("resumed from epoch %d, step %d", epoch, step)

    iters = t.iterations_per_epoch
    total_steps = t.epochs * iters
    warmup_steps = t.warmup_epochs * iters
    budget = t.max_minutes * 60.0 if t.max_minutes else None
    best_key = BEST_KEYS[t.best_metric]
    bar = _bar(progress, total_steps, step)
    started = time.perf_counter() - elapsed
    session_start, first_step = time.perf_counter(), step
    stopped_by_budget = False
    wait_total, step_total = 0.0, 0.0
    val_seconds = 0.0
    model.train()

    def epoch_batches(e: int) -> Iterator[dict[str, torch.Tensor]]:
        # One loader per epoch, seeded by the epoch number (what makes --resume exact). Its
        # iterator starts the workers at once, so the next epoch's is made one epoch early
        # and its first batches are ready when that epoch starts.
        return iter(make_loader(train_cases, cfg.data, cfg.augment, seed=t.seed * 100_003 + e))

    upcoming = epoch_batches(epoch) if epoch < t.epochs else None
    while epoch < t.epochs:
        epoch_start = time.perf_counter()
        assert upcoming is not None
        batches = upcoming
        upcoming = epoch_batches(epoch + 1) if epoch + 1 < t.epochs else None
        losses, wait = [], 0.0
        for _ in range(iters):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            time_progress = (time.perf_counter() - started) / budget if budget else 0.0
            lr = t.lr * _lr_factor(cfg, max(step / total_steps, time_progress), step, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _train_step(model, loss_fn, optimizer, scaler, batch, cfg, device, dtype)
            losses.append(loss)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", f1=_fmt(best), refresh=False)
        del batches
        epoch += 1
        epoch_s = time.perf_counter() - epoch_start
        wait_total += wait
        step_total += epoch_s
        elapsed_now = time.perf_counter() - started
        stop_now = budget is not None and (elapsed_now + epoch_s + val_seconds > budget)
        if bar is not None and budget is not None:  # the ETA follows the wall-clock budget
            seconds_per_step = (time.perf_counter() - session_start) / max(step - first_step, 1)
            steps_left = max(budget - elapsed_now, 0.0) / seconds_per_step
            bar.total = min(total_steps, step + int(steps_left))
            bar.refresh()
        row: dict[str, float] = {
            "epoch": epoch, "step": step, "lr": lr, "train_loss": float(np.mean(losses)),
            "epoch_s": epoch_s, "data_wait_s": wait,
        }  # fmt: skip
        if epoch % t.val_every == 0 or epoch == t.epochs or stop_now:
            v0 = time.perf_counter()
            summary, results, probs = validate(
                model, val_cases, cfg, plan, device=device, dtype=dtype
            )
            val_seconds = time.perf_counter() - v0
            row.update(_score(summary))
            ema = _ema(ema, row[best_key])
            row["val_ema"] = ema
            value = ema if ema is not None else math.nan
            if not math.isnan(value) and value > best:
                best, best_epoch = value, epoch
                _save(run / "checkpoints" / "best.pt", model, optimizer, cfg, plan, epoch, step,
                      time.perf_counter() - started, best, best_epoch, history + [row])  # fmt: skip
                report.write_report(results, summary, run)
                best_probs = probs
            log.info(
                "epoch %d: loss %.4f, val Dice %.3f, lesion recall %.3f, precision %.3f, F1 %.3f",
                epoch, row["train_loss"], row["val_dice"], row["val_lesion_recall"],
                row["val_lesion_precision"], row["val_lesion_f1"],
            )  # fmt: skip
        else:
            log.info("epoch %d: loss %.4f", epoch, row["train_loss"])
        row["elapsed_s"] = time.perf_counter() - started
        history.append(row)
        _save(run / "checkpoints" / "last.pt", model, optimizer, cfg, plan, epoch, step,
              row["elapsed_s"], best, best_epoch, history)  # fmt: skip
        write_text(run / "metrics.csv", _history_csv(history))
        plot_curves(history, run / "training_curves.png")
        if stop_now and epoch < t.epochs:
            stopped_by_budget = True
            log.info("wall-clock budget of %.1f min reached after epoch %d", t.max_minutes, epoch)
            break
        if should_stop is not None and should_stop(epoch):
            log.info("stopped on request after epoch %d", epoch)
            break
    del upcoming  # an unused next-epoch loader: stop its workers
    if bar is not None:
        bar.close()
    if best_epoch < 0:  # no validation ever scored (e.g. no lesions anywhere): keep the last
        last = load_checkpoint(run / "checkpoints" / "last.pt")
        save_checkpoint(run / "checkpoints" / "best.pt", last)
    if t.tune_threshold and val_cases and best_epoch >= 0:
        _tune_and_store_threshold(
            model, val_cases, best_probs, cfg, plan, run, device=device, dtype=dtype
        )
    seconds = time.perf_counter() - started
    wait_fraction = wait_total / step_total if step_total else 0.0
    log.info(
        "done: %d epochs, best %s %.4f at epoch %d, %.1f s; the step waited for data %.1f%% "
        "of the training time",
        epoch, t.best_metric, best, best_epoch, seconds, 100 * wait_fraction,
    )  # fmt: skip
    return FitResult(run, epoch, step, best_epoch, best, stopped_by_budget, seconds, wait_fraction)


def _tune_and_store_threshold(
    model: torch.nn.Module,
    val_cases: Sequence[PreprocessedCase],
    probs: list[np.ndarray] | None,
    cfg: Config,
    plan: dict[str, Any],
    run: Path,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """Tune predict's default threshold on the best checkpoint's validation probabilities
    (kept from the validation that saved ``best.pt``; recomputed only after a resume)."""
    state = load_checkpoint(run / "checkpoints" / "best.pt", map_location=device)
    if probs is None:
        model.load_state_dict(state["model"])
        probs = validation_probabilities(model, val_cases, cfg, plan, device=device, dtype=dtype)
    refs = [
        (c.label > 0).astype(np.uint8)
        if c.label is not None
        else np.zeros(c.image.shape[1:], np.uint8)
        for c in val_cases
    ]
    threshold, rows = tune_threshold(probs, refs, [c.spacing for c in val_cases], cfg)
    chosen = next(r for r in rows if r["threshold"] == threshold)
    default = min(rows, key=lambda r: abs(r["threshold"] - cfg.inference.threshold))
    log.info(
        "threshold tuned on %d validation cases: %.2f (lesion F1 %.3f, Dice %.3f) instead of "
        "%.2f (lesion F1 %.3f, Dice %.3f)",
        len(val_cases), threshold, chosen["f1"], chosen["dice"], default["threshold"],
        default["f1"], default["dice"],
    )  # fmt: skip
    plan["threshold"] = threshold
    plan["threshold_tuning"] = {
        "criterion": "mean of pooled lesion F1 and mean voxel Dice",
        "tta": False,
        "rows": rows,
    }
    for name in ("best", "last"):
        path = run / "checkpoints" / f"{name}.pt"
        ckpt = state if name == "best" else load_checkpoint(path)
        save_checkpoint(path, {**ckpt, "plan": plan})
    write_text(run / "plan.json", json.dumps(plan, indent=2))


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3f}"


def _bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr)


def _train_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    batch: dict[str, torch.Tensor],
    cfg: Config,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    x = batch["image"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    if cfg.loss.activation == "softmax":
        y = torch.cat([1.0 - y, y], dim=1)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        out = model(x)
    out = [o.float() for o in out] if isinstance(out, list | tuple) else out.float()
    loss = loss_fn(out, y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


def _save(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    plan: dict[str, Any],
    epoch: int,
    step: int,
    elapsed: float,
    best: float,
    best_epoch: int,
    history: list[dict[str, float]],
) -> None:
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"kind": cfg.train.scheduler, "elapsed_s": float(elapsed)},
            "epoch": epoch,
            "step": step,
            "best_metric": float(best),
            "best_epoch": best_epoch,
            "history": history,
            "config": config_to_dict(cfg),
            "plan": plan,
            "rng": {"torch": torch.get_rng_state()},
        },
    )
