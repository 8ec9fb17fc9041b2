"""Validation during training: whole held-out cases through the sliding window, scored as
``segmenter evaluate`` scores them, and the threshold tuned on the best checkpoint's output.

Validation predicts without mirroring (a fraction of the cost); its scores are voxel Dice and
lesion recall, precision and F1 under the config's lesion rule, not a patch pseudo-Dice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmenter.config import Config
from segmenter.evaluation import metrics, report, tuning
from segmenter.evaluation.postprocess import probabilities_to_mask
from segmenter.inference.sliding_window import foreground_probability, predict_logits
from segmenter.planning.run_plan import RunPlan
from segmenter.preprocessing.case import PreprocessedCase

log = logging.getLogger(__name__)

#: Thresholds tried when training tunes predict's default (0.10 .. 0.90).
THRESHOLD_GRID = tuning.THRESHOLDS
#: The selection metric ``train.best_metric`` names -> its ``metrics.csv`` column.
BEST_KEYS = {"lesion_f1": "val_lesion_f1", "dice": "val_dice", "lesion_recall": "val_lesion_recall"}


def validation_probabilities(
    model: torch.nn.Module,
    cases: Sequence[PreprocessedCase],
    cfg: Config,
    plan: RunPlan,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[np.ndarray]:
    """Foreground probabilities ``(X, Y, Z)`` float32 of whole preprocessed cases (no TTA)."""
    model.eval()
    probs = []
    for case in cases:
        logits = predict_logits(
            model, case.image, plan.patch_size, cfg.inference, device=device, dtype=dtype,
            tta=False,
        )  # fmt: skip
        probs.append(foreground_probability(logits, plan.activation))
    model.train()
    return probs


def binary_reference(case: PreprocessedCase) -> np.ndarray:
    """The case's lesion mask ``(X, Y, Z)`` uint8 (all labels > 0), zeros when unlabelled."""
    if case.label is None:
        return np.zeros(case.image.shape[1:], np.uint8)
    return (case.label > 0).astype(np.uint8)


def score_cases(
    cases: Sequence[PreprocessedCase], probs: Sequence[np.ndarray], cfg: Config
) -> tuple[dict[str, Any], list[report.CaseResult]]:
    """``summary.json``'s structure and the per-case results of thresholded probabilities."""
    rule = metrics.PRESETS[cfg.evaluation.preset]
    results = []
    for case, prob in zip(cases, probs, strict=True):
        pred = probabilities_to_mask(
            prob, case.spacing, threshold=cfg.inference.threshold,
            min_lesion_mm3=cfg.inference.min_lesion_mm3,
        )  # fmt: skip
        pair = report.CasePair(case.case_id, Path(f"validation/{case.case_id}"), Path(case.case_id))
        results.append(
            report.measure_case(
                pair, pred, binary_reference(case), spacing=case.spacing,
                affine=case.crop_affine, rule=rule, size_bins_mm3=cfg.evaluation.size_bins_mm3,
                labels=[1],
            )
        )  # fmt: skip
    return report.summarise(results, cfg.evaluation.preset, rule), results


def validation_scores(summary: dict[str, Any]) -> dict[str, float]:
    """The ``metrics.csv`` validation columns of a validation summary."""
    pooled = summary["lesion"]["pooled"]
    return {
        "val_dice": float(summary["foreground_mean"]["Dice"]),
        "val_lesion_recall": float(pooled["recall"]),
        "val_lesion_precision": float(pooled["precision"]),
        "val_lesion_f1": float(pooled["f1"]),
    }


def tune_threshold(
    probabilities: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    spacings: Sequence[tuple[float, ...]],
    cfg: Config,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> tuple[float, list[dict[str, float]]]:
    """The threshold with the best harmonic mean of pooled lesion F1 and voxel Dice (ties:
    nearer 0.5), at the config's minimum lesion size
    (:func:`segmenter.evaluation.tuning.grid_search`).

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


def plan_with_tuned_threshold(
    plan: RunPlan, cases: Sequence[PreprocessedCase], probs: Sequence[np.ndarray], cfg: Config
) -> RunPlan:
    """A copy of ``plan`` whose default threshold is tuned on these validation probabilities
    (:func:`tune_threshold`), with the grid recorded in ``threshold_tuning``."""
    refs = [binary_reference(c) for c in cases]
    threshold, rows = tune_threshold(probs, refs, [c.spacing for c in cases], cfg)
    chosen = next(r for r in rows if r["threshold"] == threshold)
    default = min(rows, key=lambda r: abs(r["threshold"] - cfg.inference.threshold))
    log.info(
        "threshold tuned on %d validation cases: %.2f (lesion F1 %.3f, Dice %.3f) instead of "
        "%.2f (lesion F1 %.3f, Dice %.3f)",
        len(cases), threshold, chosen["f1"], chosen["dice"], default["threshold"],
        default["f1"], default["dice"],
    )  # fmt: skip
    tuning_record = {
        "criterion": tuning.CRITERION,
        "tta": False,
        "rows": rows,
    }
    return plan.with_threshold(threshold, tuning_record)


__all__ = [
    "BEST_KEYS",
    "THRESHOLD_GRID",
    "binary_reference",
    "plan_with_tuned_threshold",
    "score_cases",
    "tune_threshold",
    "validation_probabilities",
    "validation_scores",
]
