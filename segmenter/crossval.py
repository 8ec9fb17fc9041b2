"""``segmenter crossval``: every fold, out-of-fold predictions, tuned post-processing, one summary.

For each fold K of the config's split (``train.n_folds``, or the folds asked for) a run is
trained into ``OUT/fold_K`` (a finished fold is kept; an interrupted one resumes from its
``last.pt``). Each fold's model then predicts its own validation cases, with the run's
inference settings (mirroring TTA by default), in the scans' native geometry: the out-of-fold
(OOF) probabilities, written to ``OUT/oof/probabilities`` (a rerun reads those of folds not
retrained since, with their timings from ``OUT/oof/seconds.json``, instead of predicting them
again). On them a grid search (:mod:`segmenter.tuning`) picks the threshold and minimum lesion
size (mm3; the sizes tried reach a tenth of the median volume of the reference lesions the
evaluation rule counts, :func:`segmenter.tuning.min_size_grid`); the OOF masks before tuning
(the config's ``inference.threshold`` and ``inference.min_lesion_mm3``) and after are
evaluated as ``segmenter evaluate`` does: ``OUT/oof/before/summary.json`` and ``OUT/summary.json``.
``postprocessing.json`` (the choice, both scores and the grid) goes into ``OUT`` and into every
fold's run, where ``predict`` picks it up; ``segmenter predict --model OUT`` averages the folds'
probabilities.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmenter import evaluate, metrics, tuning
from segmenter.atomic import copy_file, write_text
from segmenter.config import Config, save_config
from segmenter.errors import InputError
from segmenter.inference import POSTPROCESSING_FILE, load_predictor
from segmenter.io import read_image, write_like
from segmenter.postprocess import probabilities_to_mask
from segmenter.predict import PredictOptions, predict_probability
from segmenter.report import summary_json

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


def _train_folds(cfg: Config, out: Path, folds: Sequence[int], progress: bool) -> list[int]:
    from segmenter import train

    trained = []
    for k in folds:
        run = out / f"fold_{k}"
        if (run / DONE_FILE).is_file():
            log.info("fold %d: finished before, kept", k)
            continue
        resume = (run / "checkpoints" / "last.pt").is_file()
        result = train.fit(cfg, run, fold=k, resume=resume, progress=progress)
        done = {"epochs": result.epochs, "steps": result.steps, "minutes": result.seconds / 60}
        write_text(run / DONE_FILE, json.dumps(done, indent=2))
        trained.append(k)
    return trained


def _masks(
    probs: Sequence[np.ndarray], spacings: Sequence[Sequence[float]], threshold: float, size: float
) -> list[np.ndarray]:
    return [
        probabilities_to_mask(p, s, threshold=threshold, min_lesion_mm3=size)
        for p, s in zip(probs, spacings, strict=True)
    ]


def run_crossval(
    cfg: Config,
    out: str | Path,
    *,
    folds: Sequence[int] | None = None,
    progress: bool = True,
    thresholds: Sequence[float] = tuning.THRESHOLDS,
    min_sizes_mm3: Sequence[float] | None = None,
) -> CrossvalResult:
    """Train the folds, predict out of fold, tune post-processing, evaluate (module docstring).

    Args:
        cfg: the experiment config (``train.n_folds`` defines the split).
        out: the cross-validation folder.
        folds: fold numbers to run (default: all ``train.n_folds``).
        progress: progress bars.
        thresholds: thresholds tried by the tuning.
        min_sizes_mm3: minimum lesion sizes tried by the tuning; None:
            :func:`segmenter.tuning.min_size_grid` of the out-of-fold references.

    Raises:
        InputError: a fold number outside the split, or bad data (as ``train``).
    """
    from segmenter import train
    from segmenter.data import load_dataset

    n = cfg.train.n_folds
    chosen = list(range(n)) if folds is None else sorted(set(folds))
    bad = [k for k in chosen if not 0 <= k < n]
    if bad:
        raise InputError(f"fold {bad[0]} is not in 0..{n - 1} (train.n_folds = {n})")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    trained = _train_folds(cfg, folder, chosen, progress)

    dataset = load_dataset(train.resolve_dataset(cfg))
    by_id = {c.case_id: c for c in dataset.training}
    oof = folder / "oof"
    ending = dataset.file_ending
    probs, refs, spacings, names = [], [], [], []
    timings_file = oof / TIMINGS_FILE
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    seconds: list[float] = []
    options = PredictOptions()
    for k in chosen:
        run = folder / f"fold_{k}"
        predictor = None
        split = json.loads((run / "splits.json").read_text())[k]
        trained_at = (run / DONE_FILE).stat().st_mtime
        for case_id in split["val"]:
            case = by_id[case_id]
            assert case.label is not None
            name = f"{case_id}{ending}"
            saved = oof / "probabilities" / name
            if name in timings and saved.is_file() and saved.stat().st_mtime >= trained_at:
                reference = read_image(saved, dtype=np.float32)  # predicted by this fold's model
                prob = reference.array
            else:
                predictor = predictor or load_predictor(run)
                t0 = time.perf_counter()
                prob, reference = predict_probability(predictor, case, options)
                write_like(saved, prob, reference)
                timings[name] = time.perf_counter() - t0
                write_text(timings_file, json.dumps(timings, indent=1, sort_keys=True))
            seconds.append(float(timings[name]))
            copy_file(case.label, oof / "reference" / name)
            label = read_image(case.label).array
            probs.append(prob)
            refs.append((label > 0).astype(np.uint8))
            spacings.append(reference.spacing)
            names.append((name, reference))
        log.info("fold %d: %d out-of-fold cases predicted", k, len(split["val"]))

    rule = metrics.PRESETS[cfg.evaluation.preset]
    sizes = tuning.min_size_grid(refs, spacings, rule) if min_sizes_mm3 is None else min_sizes_mm3
    best, rows = tuning.grid_search(
        probs, refs, spacings, rule, thresholds=thresholds, min_sizes_mm3=sizes
    )
    base_thr, base_size = cfg.inference.threshold, cfg.inference.min_lesion_mm3
    before = _masks(probs, spacings, base_thr, base_size)
    after = _masks(probs, spacings, best["threshold"], best["min_lesion_mm3"])
    for (name, reference), b, a in zip(names, before, after, strict=True):
        write_like(oof / "before" / name, b, reference)
        write_like(oof / "predictions" / name, a, reference)
    bins = cfg.evaluation.size_bins_mm3
    preset = cfg.evaluation.preset
    evaluate.evaluate_folders(
        oof / "before", oof / "reference", preset=preset, size_bins_mm3=bins, out_dir=oof / "before"
    )
    summary = evaluate.evaluate_folders(
        oof / "predictions", oof / "reference", preset=preset, size_bins_mm3=bins, out_dir=folder
    )
    post = {
        "threshold": best["threshold"],
        "min_lesion_mm3": best["min_lesion_mm3"],
        "criterion": tuning.CRITERION,
        "tuned_on": f"out-of-fold predictions of folds {chosen} ({len(probs)} cases)",
        "seconds_per_case": float(np.mean(seconds)),
        "before": {"threshold": base_thr, "min_lesion_mm3": base_size,
                   **tuning.score(before, refs, spacings, rule)},
        "after": {k: best[k] for k in ("threshold", "min_lesion_mm3", "f1", "recall",
                                       "precision", "dice", "criterion")},
        "grid": rows,
    }  # fmt: skip
    text = summary_json(post)
    write_text(folder / POSTPROCESSING_FILE, text)
    for k in chosen:
        write_text(folder / f"fold_{k}" / POSTPROCESSING_FILE, text)
    b, a = post["before"], post["after"]
    log.info(
        "post-processing tuned on %d out-of-fold cases: threshold %.2f, min lesion %.1f mm3; "
        "lesion F1 %.3f -> %.3f, Dice %.3f -> %.3f",
        len(probs), a["threshold"], a["min_lesion_mm3"], _num(b["f1"]), _num(a["f1"]),
        _num(b["dice"]), _num(a["dice"]),
    )  # fmt: skip
    return CrossvalResult(folder, chosen, trained, json.loads(text), summary)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
