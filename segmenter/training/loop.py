"""Training: ``fit(cfg, run_dir)`` as a few plain functions.

One run trains one fold:

- **set-up**: preprocess the cases (through the cache), split them, write the run plan;
  build the model, loss and optimiser;
- **restore** (``--resume``): the :class:`~segmenter.training.state.TrainState` of ``last.pt``,
  the weights, the optimiser and the RNG, so the run continues exactly (the loader is seeded
  per epoch, so the patches are the same too; inside an epoch, the batches already used are
  skipped);
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

Stops: SIGINT and SIGTERM (:mod:`segmenter.interrupts`) are honoured at the next safe point:
after the optimiser step in progress, or before the next case of a validation in progress (the
validation is then redone on resume). ``last.pt`` then holds the steps done in the epoch and
their losses, and :class:`~segmenter.errors.Interrupted` tells the CLI to exit 130 or 143. A
run killed outright (SIGKILL, a power cut) loses at most what followed its last ``last.pt``:
every file is written atomically, and the temporary files of writes it cut short are removed
when a run next takes the folder.

Data-parallel (``torchrun``, :mod:`segmenter.nn.distributed`): every rank trains the same
model on its share of ``data.batch_size`` from its own patch stream, DDP averages the
gradients; the per-step loss is averaged over the ranks; rank 0 alone validates (the others
wait), decides the budget stop and writes the run folder; a stop signal on any rank stops
every rank after the same step.

Run folder: ``config.yaml`` (resolved), ``splits.json``, ``plan.json``,
``checkpoints/{best,last}.pt``, ``metrics.csv`` (one row per epoch), ``summary.json`` and
``lesions.csv`` (validation of the best checkpoint, ``segmenter evaluate``'s format),
``train.log``, ``training_curves.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from segmenter import plots
from segmenter.atomic import remove_stale_temporaries, write_text
from segmenter.config import ChannelNormalization, Config, save_config
from segmenter.data.layout import Dataset, load_dataset
from segmenter.data.splits import label_burdens, make_splits, read_splits, resolve_dataset
from segmenter.errors import InputError, Interrupted, PeerLost
from segmenter.evaluation import report
from segmenter.inference.predictor import build_from_plan, load_weights, model_from_checkpoint
from segmenter.interrupts import StopRequest, stop_requests
from segmenter.locking import FolderLock
from segmenter.nn import distributed
from segmenter.nn.checkpoint import load_checkpoint, save_checkpoint
from segmenter.nn.distributed import SINGLE, Dist
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
from segmenter.training.state import TrainState, history_csv, moving_average, seed_step

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
    dist: Dist = SINGLE

    def save(self, name: str, state: TrainState) -> None:
        """``checkpoints/{name}.pt`` holding ``state`` and the current weights (rank 0)."""
        if not self.dist.chief:
            return
        payload = state.checkpoint(
            self.model, self.step.optimizer, self.cfg, self.plan,
            world_size=self.dist.world_size,
        )  # fmt: skip
        save_checkpoint(self.run / "checkpoints" / f"{name}.pt", payload)


def _training_dataset(cfg: Config, fold: int | str) -> Dataset:
    """Load the dataset and check the fold before anything is written (fails in milliseconds)."""
    root = resolve_dataset(cfg)
    dataset = load_dataset(root)
    if not dataset.training:
        raise InputError(f"{root}: no training cases")
    if fold == "all" and cfg.train.validation == "held_out":
        raise InputError(
            "train.validation: held_out needs a fold number: --fold all holds no case out "
            "(use training, none or auto)"
        )
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
    cfg: Config,
    dataset: Dataset,
    cases: list[PreprocessedCase],
    fold: int | str,
    *,
    saved: Path | None = None,
) -> tuple[list[dict[str, list[str]]], list[PreprocessedCase], list[PreprocessedCase]]:
    """All folds' splits and this fold's training and validation cases.

    The folds are stratified by each label file's lesion volume as stored
    (:func:`~segmenter.data.splits.label_burdens`), so every target spacing, crop and cache
    holds out the same cases. A resumed run keeps the split it saved (``saved``, its
    ``splits.json``), whatever the code or data computed since.
    """
    ids = [c.case_id for c in cases]
    if fold == "all":
        splits = [{"train": sorted(ids), "val": sorted(ids)}]
        split = splits[0]
    elif saved is not None and saved.is_file():
        splits = read_splits(saved, ids)
        if int(fold) >= len(splits):
            raise InputError(f"{saved}: no fold {fold} (it holds {len(splits)} folds)")
        split = splits[int(fold)]
    else:
        raw = dataset.training
        by_case = dict(zip((c.case_id for c in raw), label_burdens(raw), strict=True))
        burdens = [by_case[i] for i in ids]
        splits = make_splits(ids, burdens, cfg.train.n_folds, cfg.train.resolved_split_seed)
        split = splits[int(fold)]
    by_id = {c.case_id: c for c in cases}
    return splits, [by_id[c] for c in split["train"]], [by_id[c] for c in split["val"]]


def _preprocess(cfg: Config, dataset: Dataset, dist: Dist, progress: bool) -> list:
    """The preprocessed training cases; with a cache, rank 0 fills it before the others read."""
    cache = cfg.data.cache_dir or None
    spec = PreprocessingSpec.from_data(cfg.data)
    if cache and not dist.chief:
        dist.barrier()
    cases = preprocess_dataset(
        dataset.training, spec, cache_dir=cache, workers=2, progress=progress
    )
    if cache and dist.chief:
        dist.barrier()
    return cases


def _set_up(
    cfg: Config,
    dataset: Dataset,
    run: Path,
    *,
    fold: int | str,
    progress: bool,
    dist: Dist,
    resume: bool = False,
) -> _Session:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = distributed.device_for(resolve_device(t.device), dist)
    dtype = autocast_dtype(t.precision, device)
    if device.type == "cpu":
        tune_allocator()
    if dist.chief:
        save_config(cfg, run / "config.yaml")
    cases = _preprocess(cfg, dataset, dist, progress)
    saved = run / "splits.json" if resume else None
    splits, train_cases, val_cases = _split_cases(cfg, dataset, cases, fold, saved=saved)
    mode = t.validation_for(fold)
    if mode != "held_out":
        val_cases = list(train_cases) if mode == "training" else []
    plan = build_run_plan(dataset, cfg, cases, fold)
    if dist.chief:
        write_text(run / "splits.json", json.dumps(splits, indent=2))
        write_run_plan(plan, run)
    log.info(
        "fold %s: %d training cases, validation on %s; device %s, autocast %s",
        fold, len(train_cases), _validation_text(mode, len(val_cases)), device, dtype,
    )  # fmt: skip
    if dist.active:
        log.info(
            "distributed: world size %d (%s), %d patches per rank of the global batch %d",
            dist.world_size, "nccl" if device.type == "cuda" else "gloo",
            distributed.per_rank_batch(cfg.data.batch_size, dist), cfg.data.batch_size,
        )  # fmt: skip
    torch.manual_seed(t.seed)
    model = build_from_plan(cfg, plan).place(device)
    ddp = distributed.wrap_model(model, dist, unused_parameters=cfg.model.deep_supervision)
    return _Session(
        cfg=cfg, run=run, device=device, dtype=dtype, plan=plan, train_cases=train_cases,
        val_cases=val_cases, model=model, dist=dist,
        step=TrainStep(
            cfg=cfg, model=ddp, loss_fn=build_loss(cfg.loss, sync=dist if dist.active else None),
            optimizer=build_optimizer(t, model), device=device, dtype=dtype,
            scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None, dist=dist,
        ),
    )  # fmt: skip


def _validation_text(mode: str, n_cases: int) -> str:
    if mode == "none":
        return "none (best.pt is the last checkpoint, predict keeps inference.threshold)"
    where = "held-out" if mode == "held_out" else "training"
    return f"{n_cases} {where} case(s)"


def _restore(session: _Session) -> TrainState:
    """The state of ``last.pt``, its weights, optimiser and RNG loaded into the session."""
    path = session.run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path, map_location=session.device)
    load_weights(session.model, ckpt["model"], path)
    session.step.optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state = TrainState.from_checkpoint(ckpt)
    done = state.progress.steps
    inside = f" ({done} steps into epoch {state.epoch + 1})" if done else ""
    log.info("resumed after epoch %d, step %d%s", state.epoch, state.step, inside)
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


def _epoch_batches(
    session: _Session, epoch: int, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Epoch ``epoch``'s batches (0-based). One loader per epoch, seeded by the epoch number
    (what makes --resume exact). After a mid-epoch stop ``skip`` steps of the epoch were done:
    the batches they used are drawn again and dropped, so the epoch goes on with the batches it
    would have had (none at all when every step was done)."""
    cfg = session.cfg
    if skip >= cfg.train.iterations_per_epoch:
        return iter(())
    seed = cfg.train.seed * 100_003 + epoch
    dist = session.dist
    data = replace(cfg.data, batch_size=distributed.per_rank_batch(cfg.data.batch_size, dist))
    loader = make_loader(session.train_cases, data, cfg.augment, seed=seed, rank=dist.rank)
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    return batches


@dataclass
class _Loaders:
    """The running epoch's batches and the next epoch's. An iterator starts its workers at once,
    so the next epoch's is made one epoch early and its first batches are ready when that epoch
    starts; dropping an iterator stops its workers."""

    session: _Session
    current: Iterator[dict[str, torch.Tensor]] | None = None
    upcoming: Iterator[dict[str, torch.Tensor]] | None = None

    def start_epoch(self, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """The unfinished epoch's batches from where its progress stopped; the next epoch's
        loader starts."""
        done = state.progress.steps
        if self.upcoming is not None and done == 0:
            self.current = self.upcoming
        else:
            self.current = _epoch_batches(self.session, state.epoch, skip=done)
        more = state.epoch + 1 < self.session.cfg.train.epochs
        self.upcoming = _epoch_batches(self.session, state.epoch + 1) if more else None
        return self.current

    def close(self) -> None:
        """Stop every worker."""
        self.current = self.upcoming = None


def _train_epoch(
    session: _Session,
    state: TrainState,
    batches: Iterator[dict[str, torch.Tensor]],
    clock: _Clock,
    *,
    bar: Any,
    stop: StopRequest,
) -> bool:
    """Optimiser steps until the epoch's are all done or a stop is requested (checked after
    every step); ``state.step`` and ``state.progress`` advance. Returns whether the epoch's steps
    are all done without a stop request."""
    t = session.cfg.train
    total_steps = t.epochs * t.iterations_per_epoch
    part = state.progress
    start, wait = time.perf_counter(), 0.0
    while part.steps < t.iterations_per_epoch and not stop.requested:
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        progress = max(state.step / total_steps, clock.time_progress())
        lr = t.lr * lr_factor(t, progress, state.step, t.warmup_epochs * t.iterations_per_epoch)
        for group in session.step.optimizer.param_groups:
            group["lr"] = lr
        seed_step(t.seed, session.dist.rank, state.step)
        loss = session.step(batch)
        part.losses.append(loss)
        part.steps, part.lr = part.steps + 1, lr
        state.step += 1
        _show_step(bar, loss, state)
        _agree_on_stop(session, stop)
    seconds = time.perf_counter() - start
    part.seconds += seconds
    part.wait_s += wait
    clock.wait_total += wait
    clock.step_total += seconds
    return not stop.requested


@dataclass
class _AgreedStop(StopRequest):
    """Under DDP, the stop request the ranks agreed on (:func:`_agree_on_stop`): it changes
    only where every rank checks it, so all of them stop after the same step; ``local`` is
    what this rank's signal handlers recorded."""

    local: StopRequest = field(default_factory=StopRequest)


def _agree_on_stop(session: _Session, stop: StopRequest) -> None:
    """Under DDP, a stop signal any rank received stops every rank (after the same step)."""
    if not isinstance(stop, _AgreedStop) or stop.requested:
        return
    (signum,) = session.dist.max_ints([stop.local.signum or 0], session.device)
    if signum:
        stop.handle(signum, None)


def _show_step(bar: Any, loss: float, state: TrainState) -> None:
    if bar is not None:
        bar.update(1)
        best = state.best_metric if math.isfinite(state.best_metric) else None
        bar.set_postfix(loss=f"{loss:.4f}", f1=report.format_metric(best), refresh=False)


def _epoch_row(state: TrainState) -> dict[str, float]:
    """The ``metrics.csv`` row of the epoch whose steps are done, so far (no validation)."""
    part = state.progress
    return {
        "epoch": state.epoch + 1, "step": state.step, "lr": part.lr,
        "train_loss": float(np.mean(part.losses)), "epoch_s": part.seconds,
        "data_wait_s": part.wait_s,
    }  # fmt: skip


def _validation_probabilities(session: _Session, stop: StopRequest) -> list[np.ndarray] | None:
    """The validation cases' probabilities, case by case, on rank 0; None when a stop was
    requested before one of them (a safe point: validation is redone on resume), and on the
    other ranks. Under DDP each rank predicts every ``world_size``-th case (rank r: cases r,
    r + W, ...) and rank 0 gathers them; a stop is then left to the next agreement (every
    rank must reach the gather)."""
    dist = session.dist
    cases = session.val_cases
    mine: dict[int, np.ndarray] = {}
    for i in range(dist.rank, len(cases), dist.world_size):
        if stop.requested and not dist.active:
            return None
        (mine[i],) = validation.validation_probabilities(
            session.model, [cases[i]], session.cfg, session.plan, device=session.device,
            dtype=session.dtype,
        )  # fmt: skip
    shares = dist.gather_to_chief(mine)
    if shares is None:
        return None
    if dist.active:
        log.info("validated %d cases over %d ranks (%s per rank)", len(cases), dist.world_size,
                 ", ".join(str(len(share)) for share in shares))  # fmt: skip
    merged = {i: prob for share in shares for i, prob in share.items()}
    return [merged[i] for i in range(len(cases))]


def _validate_and_select(
    session: _Session,
    state: TrainState,
    row: dict[str, float],
    clock: _Clock,
    *,
    stop: StopRequest,
) -> list[np.ndarray] | None:
    """Validate (every rank its share, :func:`_validation_probabilities`); on rank 0 add the
    scores and their moving average to ``row``, and save ``best.pt`` (and the validation
    report) when the average improved. Returns the validation probabilities when they became
    the best, else None. A stop request during the validation abandons it
    (:func:`_stop_here`)."""
    cfg = session.cfg
    v0 = time.perf_counter()
    probs = _validation_probabilities(session, stop)
    if not session.dist.chief:
        return None
    if probs is None:
        _stop_here(session, state, clock, stop)
    summary, results = validation.score_cases(session.val_cases, probs, cfg)
    clock.val_seconds = time.perf_counter() - v0
    row.update(validation.validation_scores(summary))
    row["val_ema"] = moving_average(state.ema, row[validation.BEST_KEYS[cfg.train.best_metric]])
    log.info(
        "epoch %d: loss %.4f, val Dice %.3f, lesion recall %.3f, precision %.3f, F1 %.3f",
        row["epoch"], row["train_loss"], row["val_dice"], row["val_lesion_recall"],
        row["val_lesion_precision"], row["val_lesion_f1"],
    )  # fmt: skip
    value = row["val_ema"] if row["val_ema"] is not None else math.nan
    if math.isnan(value) or not value > state.best_metric:
        return None
    state.best_metric, state.best_epoch = value, int(row["epoch"])
    best = replace(state, elapsed_s=clock.elapsed(), history=list(state.history))
    best.end_epoch(row)
    session.save("best", best)
    report.write_report(results, summary, session.run)
    return probs


def _end_epoch(session: _Session, state: TrainState, row: dict[str, float], clock: _Clock) -> None:
    """Count the epoch as done; write ``last.pt``, ``metrics.csv`` and the curves."""
    row["elapsed_s"] = clock.elapsed()
    state.end_epoch(row)
    state.elapsed_s = row["elapsed_s"]
    session.save("last", state)
    if session.dist.chief:
        write_text(session.run / "metrics.csv", history_csv(state.history))
        plots.run_curves(state.history, session.run / "training_curves.png")


def _stop_here(session: _Session, state: TrainState, clock: _Clock, stop: StopRequest) -> NoReturn:
    """Save the unfinished epoch's progress as ``last.pt``, then raise :class:`Interrupted`."""
    state.elapsed_s = clock.elapsed()
    session.save("last", state)
    raise _interrupted(session, state, stop)


def _interrupted(session: _Session, state: TrainState, stop: StopRequest) -> Interrupted:
    """The exception, and the log line, for a stop request honoured with ``state`` saved."""
    t = session.cfg.train
    steps = f"step {state.step} of {t.epochs * t.iterations_per_epoch}"
    done = state.progress.steps
    if done == 0:
        where = f"after epoch {state.epoch} of {t.epochs} ({steps})"
    elif done < t.iterations_per_epoch:
        where = f"in epoch {state.epoch + 1} of {t.epochs}, after {steps}"
    else:
        where = f"in epoch {state.epoch + 1} of {t.epochs}, after {steps}, before its validation"
    last = session.run / "checkpoints" / "last.pt"
    log.info("%s received: stopped %s, progress saved in %s", stop.name, where, last)
    assert stop.signum is not None
    return Interrupted(
        f"stopped by {stop.name} {where}; progress saved in {last}",
        signum=stop.signum, folder=session.run,
    )  # fmt: skip


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
    dist: Dist = SINGLE,
) -> FitResult:
    """Train one fold of ``cfg`` into ``run_dir`` (see the module docstring).

    While it trains, SIGINT and SIGTERM ask for a stop (:mod:`segmenter.interrupts`): the run
    stops after the optimiser step in progress (or before the next validation case), saves
    ``last.pt`` with the steps done in the epoch, and raises :class:`Interrupted`; ``resume``
    then continues exactly. Temporary files that a killed run left in ``run_dir`` are removed.

    Args:
        cfg: the resolved experiment config.
        run_dir: run folder (created; must not hold a run unless ``resume``).
        fold: cross-validation fold number, or ``"all"`` (train and validate on every case).
        resume: continue from ``run_dir/checkpoints/last.pt``.
        progress: draw a progress bar on stderr.
        should_stop: called with the number of finished epochs after each epoch's checkpoint
            is saved; True ends the run there (it can be resumed later), e.g. from a notebook.
        dist: this process's place in a data-parallel run (:mod:`segmenter.nn.distributed`;
            the process group is set up here); only rank 0 writes ``run_dir``.

    Raises:
        InputError: bad dataset, fold or resume state (a damaged ``last.pt`` is refused before
            the run folder is touched), or a run whose estimated memory
            (:func:`segmenter.planning.memory.check_training`, from the headers, before anything
            is read or written) exceeds what is available; a run folder this call created is
            removed again when it is refused before the first checkpoint.
        Interrupted: a stop signal arrived; the progress is saved.
        PeerLost: another rank died or a collective timed out.
    """
    run = Path(run_dir)
    _check_resume(run, resume, dist)
    distributed.per_rank_batch(cfg.data.batch_size, dist)
    dataset = _training_dataset(cfg, fold)
    check_training(dataset, _training_job(cfg, dataset, fold))
    created = not run.exists()
    lock = FolderLock(run, "train") if dist.chief else contextlib.nullcontext()
    try:
        with distributed.process_group(dist, resolve_device(cfg.train.device)), lock:
            return _fit_locked(
                cfg, dataset, run, fold=fold, resume=resume, progress=progress,
                should_stop=should_stop, dist=dist,
            )  # fmt: skip
    except InputError:
        if dist.chief and created and not (run / "checkpoints").exists():
            shutil.rmtree(run, ignore_errors=True)  # refused in set-up: no half-made run folder
        raise
    except RuntimeError as exc:
        if not (dist.active and distributed.is_peer_failure(exc)):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PeerLost(
            f"rank {dist.rank} of {dist.world_size}: another rank died or a collective timed "
            f"out (timeout {dist.timeout_s:.0f} s, {distributed.TIMEOUT_VARIABLE}): {first}"
        ) from None


def _check_resume(run: Path, resume: bool, dist: Dist) -> None:
    """Refuse a resume without ``last.pt``, a damaged one, one of another world size, or a
    fresh run into a trained folder, before the run folder is touched."""
    last_path = run / "checkpoints" / "last.pt"
    if resume and not last_path.is_file():
        raise InputError(f"{run}: nothing to resume (no checkpoints/last.pt)")
    if not resume and last_path.exists():
        raise InputError(f"{run}: already holds a trained run (use --resume or another --out)")
    if not resume:
        return
    ckpt = load_checkpoint(last_path)
    model_from_checkpoint(last_path, ckpt)
    saved = int(ckpt.get("world_size", 1))
    if saved != dist.world_size:
        how = "plain segmenter train" if saved == 1 else f"torchrun --nproc_per_node {saved}"
        raise InputError(
            f"{last_path}: trained by {saved} process(es), resumed with {dist.world_size}; "
            f"resume with {how} (the patch streams and batch split depend on the world size)"
        )


def _fit_locked(
    cfg: Config,
    dataset: Dataset,
    run: Path,
    *,
    fold: int | str,
    resume: bool,
    progress: bool,
    should_stop: Callable[[int], bool] | None,
    dist: Dist,
) -> FitResult:
    """:func:`fit` once the run folder is locked: stale temporaries removed, the log attached
    (by rank 0; the other ranks write nothing and log only to stderr)."""
    stale = remove_stale_temporaries(run) if dist.chief else []
    handler: logging.Handler = logging.NullHandler()
    if dist.chief:
        handler = logging.FileHandler(run / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    pkg_log = logging.getLogger("segmenter")
    pkg_log.addHandler(handler)
    try:
        if stale:
            log.info("removed %d temporary file(s) a killed run left: %s", len(stale),
                     ", ".join(str(p.relative_to(run)) for p in stale))  # fmt: skip
        session = _set_up(cfg, dataset, run, fold=fold, progress=progress, dist=dist, resume=resume)
        state = _restore(session) if resume else TrainState()
        with stop_requests() as signals:
            stop = _AgreedStop(local=signals) if dist.active else signals
            return _train(session, state, progress=progress, should_stop=should_stop, stop=stop)
    finally:
        pkg_log.removeHandler(handler)
        handler.close()


def _train(
    session: _Session,
    state: TrainState,
    *,
    progress: bool,
    should_stop: Callable[[int], bool] | None,
    stop: StopRequest,
) -> FitResult:
    t = session.cfg.train
    clock = _Clock.start(session.cfg, state)
    bar = _bar(progress, t.epochs * t.iterations_per_epoch, state.step)
    loaders = _Loaders(session)
    try:
        best_probs, stopped_by_budget = _epochs(
            session, state, clock, loaders, bar=bar, stop=stop, should_stop=should_stop
        )
    finally:
        loaders.close()
        if bar is not None:
            bar.close()
    if session.dist.active:
        log.info("rank %d of %d: training ended after step %d (epoch %d)", session.dist.rank,
                 session.dist.world_size, state.step, state.epoch)  # fmt: skip
    _finish(session, state, best_probs)
    if stop.requested:
        log.info("%s arrived during the final threshold tuning; the run finished", stop.name)
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


def _epochs(
    session: _Session,
    state: TrainState,
    clock: _Clock,
    loaders: _Loaders,
    *,
    bar: Any,
    stop: StopRequest,
    should_stop: Callable[[int], bool] | None,
) -> tuple[list[np.ndarray] | None, bool]:
    """Epochs until the last, the budget, ``should_stop`` or a stop request (which raises
    :class:`Interrupted` once the progress is saved). Returns the validation probabilities of
    ``best.pt`` when this session made them (else None), and whether the budget ended it."""
    t = session.cfg.train
    best_probs: list[np.ndarray] | None = None
    session.model.train()
    while state.epoch < t.epochs:
        if not _train_epoch(session, state, loaders.start_epoch(state), clock, bar=bar, stop=stop):
            _stop_here(session, state, clock, stop)
        loaders.current = None  # this epoch's workers stop before validation
        row = _epoch_row(state)
        stop_now = _chief_decides(session, clock.over_budget_after(row["epoch_s"]))
        _update_eta(bar, state, clock, t.epochs * t.iterations_per_epoch)
        due = row["epoch"] % t.val_every == 0 or row["epoch"] == t.epochs or stop_now
        # every rank validates its share; the others then wait for rank 0's scoring at the
        # next agreement
        if due and session.val_cases:
            best_probs = _validate_and_select(session, state, row, clock, stop=stop) or best_probs
        else:
            log.info("epoch %d: loss %.4f", row["epoch"], row["train_loss"])
        _end_epoch(session, state, row, clock)
        _agree_on_stop(session, stop)
        if stop.requested:
            raise _interrupted(session, state, stop)
        if stop_now and state.epoch < t.epochs:
            log.info("wall-clock budget of %.1f min reached after epoch %d", t.max_minutes,
                     state.epoch)  # fmt: skip
            return best_probs, True
        asked = should_stop is not None and session.dist.chief and should_stop(state.epoch)
        if _chief_decides(session, asked):
            log.info("stopped on request after epoch %d", state.epoch)
            break
    return best_probs, False


def _chief_decides(session: _Session, decision: bool) -> bool:
    """Rank 0's ``decision``, on every rank (the others wait for it: a barrier)."""
    if not session.dist.active:
        return decision
    return bool(session.dist.max_ints([int(decision and session.dist.chief)], session.device)[0])


def _finish(session: _Session, state: TrainState, best_probs: list[np.ndarray] | None) -> None:
    """``best.pt`` exists; predict's default threshold tuned on it when asked (rank 0)."""
    if not session.dist.chief:
        return
    checkpoints = session.run / "checkpoints"
    # no validation ever scored (e.g. no lesions anywhere), or none asked for (then a best.pt
    # from an earlier validating run that this one resumed is replaced too): keep last
    if state.best_epoch < 0 or not session.val_cases:
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
        dist: the data-parallel run (``model`` is then DDP-wrapped: ``backward`` averages the
            gradients over the ranks before clipping); the returned loss is the ranks' mean.
    """

    cfg: Config
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    dist: Dist = SINGLE

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
        return self.dist.mean(float(loss.detach()), self.device)


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
