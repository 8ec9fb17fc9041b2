"""``segmenter crossval``: every fold, out-of-fold predictions, tuned post-processing, one summary.

- **train**: each fold K of the config's split (``train.n_folds``, or the folds asked for) into
  ``OUT/fold_K``; a finished fold is kept, an interrupted one resumes from its ``last.pt``; with
  ``devices`` the folds train in parallel processes, one per device
  (:mod:`segmenter.workflows.parallel`);
- **predict out of fold**: each fold's model predicts its own validation cases with the run's
  inference settings (mirroring TTA by default) in the scans' native geometry, into
  ``OUT/oof/probabilities``; a rerun reads the maps of folds not retrained since (timings in
  ``OUT/oof/seconds.json``) instead of predicting them again, so a rerun after an interruption
  in this step predicts only the cases not written yet (every write is atomic: a map exists
  whole or not at all; the temporary files a killed run left are removed on the rerun);
- **tune**: a grid search (:mod:`segmenter.evaluation.tuning`) picks the threshold and minimum
  lesion size in mm3 (the sizes reach a tenth of the median volume of the reference lesions the
  evaluation rule counts, :func:`segmenter.evaluation.tuning.min_size_grid`);
- **evaluate**: the OOF masks before tuning (the config's ``inference.threshold`` and
  ``inference.min_lesion_mm3``) and after, as ``segmenter evaluate`` does:
  ``OUT/oof/before/summary.json`` and ``OUT/summary.json``;
- **record**: ``postprocessing.json`` (the choice, both scores and the grid) in ``OUT`` and in
  every fold's run, where ``predict`` picks it up; ``segmenter predict --model OUT`` averages
  the folds' probabilities.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.atomic import copy_file, remove_stale_temporaries, write_text
from segmenter.config import Config, save_config
from segmenter.data.layout import Case, load_dataset
from segmenter.data.splits import fold_dir, resolve_dataset
from segmenter.errors import InputError
from segmenter.evaluation import evaluate, metrics, tuning
from segmenter.evaluation.report import summary_json
from segmenter.inference.predict import PredictOptions, predict_probability
from segmenter.inference.predictor import POSTPROCESSING_FILE, Predictor, load_predictor
from segmenter.io import Image, read_image, write_like
from segmenter.locking import FolderLock

log = logging.getLogger(__name__)

DONE_FILE = "crossval_done.json"
#: Seconds each out-of-fold prediction took, by file name (``OUT/oof/seconds.json``).
TIMINGS_FILE = "seconds.json"


@dataclass(frozen=True)
class CrossvalResult:
    """What ``segmenter crossval`` produced."""

    folder: Path
    folds: list[int]
    trained: list[int]
    postprocessing: dict[str, Any]
    summary: dict[str, Any]


@dataclass
class OutOfFold:
    """The out-of-fold predictions, one entry per validation case of the folds run.

    Attributes:
        probabilities: ``(X, Y, Z)`` float32 foreground probabilities in the scan's grid.
        references: ``(X, Y, Z)`` uint8 binary references.
        spacings: voxel sizes in mm.
        files: each case's file name and its image (the geometry masks are written with).
        seconds: seconds each prediction took (when it was made).
    """

    probabilities: list[np.ndarray] = field(default_factory=list)
    references: list[np.ndarray] = field(default_factory=list)
    spacings: list[tuple[float, ...]] = field(default_factory=list)
    files: list[tuple[str, Image]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _chosen_folds(cfg: Config, folds: Sequence[int] | None) -> list[int]:
    n = cfg.train.n_folds
    chosen = list(range(n)) if folds is None else sorted(set(folds))
    bad = [k for k in chosen if not 0 <= k < n]
    if bad:
        raise InputError(f"fold {bad[0]} is not in 0..{n - 1} (train.n_folds = {n})")
    return chosen


def _train_folds(
    cfg: Config, out: Path, folds: Sequence[int], *, progress: bool, devices: Sequence[str] | None
) -> list[int]:
    from segmenter.training import loop

    todo = []
    for k in folds:
        if (fold_dir(out, k) / DONE_FILE).is_file():
            log.info("fold %d: finished before, kept", k)
        else:
            todo.append(k)
    if devices:
        _train_in_parallel(cfg, out, todo, devices)
        return todo
    for k in todo:
        run = fold_dir(out, k)
        resume = (run / "checkpoints" / "last.pt").is_file()
        result = loop.fit(cfg, run, fold=k, resume=resume, progress=progress)
        done = {"epochs": result.epochs, "steps": result.steps, "minutes": result.seconds / 60}
        write_text(run / DONE_FILE, json.dumps(done, indent=2))
    return todo


def _train_in_parallel(
    cfg: Config, out: Path, folds: Sequence[int], devices: Sequence[str]
) -> None:
    """The folds as separate ``train`` processes, one per device at a time
    (:mod:`segmenter.workflows.parallel`); ``OUT/config.yaml`` is the config they read."""
    from segmenter.workflows import parallel

    tasks = [parallel.TrainingTask(out / "config.yaml", k, fold_dir(out, k)) for k in folds]
    log.info("training folds %s on devices %s", list(folds), list(devices))
    threads_set = cfg.train.threads is not None
    for r in parallel.run_parallel(tasks, devices, threads_set=threads_set):
        done = {"epochs": r.epochs, "steps": r.steps, "minutes": r.minutes}
        write_text(r.task.run / DONE_FILE, json.dumps(done, indent=2))


def _fold_probability(
    predictor: Callable[[], Predictor],
    case: Case,
    saved: Path,
    *,
    timings: dict[str, float],
    trained_at: float,
) -> tuple[np.ndarray, Image]:
    """A validation case's probabilities by its fold's model: the map saved at ``saved`` when
    that model wrote it (not retrained since ``trained_at``), else predicted now, saved and
    timed into ``timings``."""
    name = saved.name
    if name in timings and saved.is_file() and saved.stat().st_mtime >= trained_at:
        reference = read_image(saved, dtype=np.float32)
        return reference.array, reference
    t0 = time.perf_counter()
    prob, reference = predict_probability(predictor(), case, PredictOptions())
    write_like(saved, prob, reference)
    timings[name] = time.perf_counter() - t0
    return prob, reference


def predict_out_of_fold(cfg: Config, folder: Path, folds: Sequence[int]) -> OutOfFold:
    """Each fold's validation cases predicted by that fold's model, in their native grid
    (``OUT/oof/probabilities``; references copied to ``OUT/oof/reference``, timings in
    ``OUT/oof/seconds.json``)."""
    dataset = load_dataset(resolve_dataset(cfg))
    by_id = {c.case_id: c for c in dataset.training}
    oof_dir = folder / "oof"
    timings_file = oof_dir / TIMINGS_FILE
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    oof = OutOfFold()
    for k in folds:
        run = fold_dir(folder, k)
        split = json.loads((run / "splits.json").read_text())[k]
        predictor = functools.cache(functools.partial(load_predictor, run))  # once, if needed
        trained_at = (run / DONE_FILE).stat().st_mtime
        for case_id in split["val"]:
            case = by_id[case_id]
            assert case.label is not None
            name = f"{case_id}{dataset.file_ending}"
            prob, reference = _fold_probability(
                predictor, case, oof_dir / "probabilities" / name, timings=timings,
                trained_at=trained_at,
            )  # fmt: skip
            write_text(timings_file, json.dumps(timings, indent=1, sort_keys=True))
            copy_file(case.label, oof_dir / "reference" / name)
            oof.probabilities.append(prob)
            oof.references.append((read_image(case.label).array > 0).astype(np.uint8))
            oof.spacings.append(reference.spacing)
            oof.files.append((name, reference))
            oof.seconds.append(float(timings[name]))
        log.info("fold %d: %d out-of-fold cases predicted", k, len(split["val"]))
    return oof


def _evaluate_masks(
    cfg: Config, oof: OutOfFold, post: dict[str, Any], folder: Path
) -> dict[str, Any]:
    """Write the OOF masks before and after tuning and evaluate both; returns the summary
    after tuning (``OUT/summary.json``)."""
    oof_dir = folder / "oof"
    for sub, row in (("before", post["before"]), ("predictions", post["after"])):
        masks = tuning.masks_at(
            oof.probabilities, oof.spacings, row["threshold"], row["min_lesion_mm3"]
        )
        for (name, reference), mask in zip(oof.files, masks, strict=True):
            write_like(oof_dir / sub / name, mask, reference)
    options = {"preset": cfg.evaluation.preset, "size_bins_mm3": cfg.evaluation.size_bins_mm3}
    reference_dir = oof_dir / "reference"
    evaluate.evaluate_folders(oof_dir / "before", reference_dir, out_dir=oof_dir / "before",
                              **options)  # fmt: skip
    return evaluate.evaluate_folders(oof_dir / "predictions", reference_dir, out_dir=folder,
                                     **options)  # fmt: skip


def tune_postprocessing(
    cfg: Config,
    oof: OutOfFold,
    *,
    tuned_on: str,
    thresholds: Sequence[float],
    min_sizes_mm3: Sequence[float] | None,
) -> dict[str, Any]:
    """The ``postprocessing.json`` record: the grid search's choice on the out-of-fold
    predictions, its score and the config's (``before``), and the grid."""
    rule = metrics.PRESETS[cfg.evaluation.preset]
    probs, refs, spacings = oof.probabilities, oof.references, oof.spacings
    sizes = tuning.min_size_grid(refs, spacings, rule) if min_sizes_mm3 is None else min_sizes_mm3
    best, rows = tuning.grid_search(
        probs, refs, spacings, rule, thresholds=thresholds, min_sizes_mm3=sizes
    )
    base_thr, base_size = cfg.inference.threshold, cfg.inference.min_lesion_mm3
    before = tuning.score(tuning.masks_at(probs, spacings, base_thr, base_size), refs, spacings,
                          rule)  # fmt: skip
    return {
        "threshold": best["threshold"],
        "min_lesion_mm3": best["min_lesion_mm3"],
        "criterion": tuning.CRITERION,
        "tuned_on": tuned_on,
        "seconds_per_case": float(np.mean(oof.seconds)),
        "before": {"threshold": base_thr, "min_lesion_mm3": base_size, **before},
        "after": {k: best[k] for k in ("threshold", "min_lesion_mm3", "f1", "recall",
                                       "precision", "dice", "criterion")},
        "grid": rows,
    }  # fmt: skip


def run_crossval(
    cfg: Config,
    out: str | Path,
    *,
    folds: Sequence[int] | None = None,
    progress: bool = True,
    thresholds: Sequence[float] = tuning.THRESHOLDS,
    min_sizes_mm3: Sequence[float] | None = None,
    devices: Sequence[str] | None = None,
) -> CrossvalResult:
    """Train the folds, predict out of fold, tune post-processing, evaluate (module docstring).

    Args:
        cfg: the experiment config (``train.n_folds`` defines the split).
        out: the cross-validation folder.
        folds: fold numbers to run (default: all ``train.n_folds``).
        progress: progress bars.
        thresholds: thresholds tried by the tuning.
        min_sizes_mm3: minimum lesion sizes tried by the tuning; None:
            :func:`segmenter.evaluation.tuning.min_size_grid` of the out-of-fold references.
        devices: train the folds in parallel, one per device (CUDA indices or ``cpu``,
            :mod:`segmenter.workflows.parallel`); None: one after another in this process.

    Raises:
        InputError: a fold number outside the split, or bad data (as ``train``).
    """
    chosen = _chosen_folds(cfg, folds)
    if devices:
        from segmenter.workflows.parallel import parse_devices

        devices = parse_devices(devices)
    with FolderLock(out, "crossval"):
        return _run_crossval(
            cfg, Path(out), chosen, progress=progress, thresholds=thresholds,
            min_sizes_mm3=min_sizes_mm3, devices=devices,
        )  # fmt: skip


def _run_crossval(
    cfg: Config,
    folder: Path,
    chosen: list[int],
    *,
    progress: bool,
    thresholds: Sequence[float],
    min_sizes_mm3: Sequence[float] | None,
    devices: Sequence[str] | None,
) -> CrossvalResult:
    _remove_stale(folder)
    save_config(cfg, folder / "config.yaml")
    trained = _train_folds(cfg, folder, chosen, progress=progress, devices=devices)
    oof = predict_out_of_fold(cfg, folder, chosen)
    post = tune_postprocessing(
        cfg, oof, tuned_on=f"out-of-fold predictions of folds {chosen} ({len(oof.files)} cases)",
        thresholds=thresholds, min_sizes_mm3=min_sizes_mm3,
    )  # fmt: skip
    summary = _evaluate_masks(cfg, oof, post, folder)
    text = summary_json(post)
    write_text(folder / POSTPROCESSING_FILE, text)
    for k in chosen:
        write_text(fold_dir(folder, k) / POSTPROCESSING_FILE, text)
    b, a = post["before"], post["after"]
    log.info(
        "post-processing tuned on %d out-of-fold cases: threshold %.2f, min lesion %.1f mm3; "
        "lesion F1 %.3f -> %.3f, Dice %.3f -> %.3f",
        len(oof.files), a["threshold"], a["min_lesion_mm3"], _num(b["f1"]), _num(a["f1"]),
        _num(b["dice"]), _num(a["dice"]),
    )  # fmt: skip
    return CrossvalResult(
        folder=folder,
        folds=chosen,
        trained=trained,
        postprocessing=json.loads(text),
        summary=summary,
    )


def _remove_stale(folder: Path) -> None:
    """Remove the temporary files a killed ``crossval`` left in its folder and under ``oof``
    (each fold's run removes its own when it is trained, :func:`segmenter.training.loop.fit`)."""
    stale = remove_stale_temporaries(folder, recursive=False)
    stale += remove_stale_temporaries(folder / "oof")
    if stale:
        names = ", ".join(str(p.relative_to(folder)) for p in stale)
        log.info("removed %d temporary file(s) a killed run left: %s", len(stale), names)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
