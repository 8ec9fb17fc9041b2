"""Post-processing tuned on held-out probabilities: threshold and minimum lesion size.

One grid search (:func:`grid_search`) serves the per-fold threshold tuning at the end of
training and the out-of-fold tuning of ``segmenter crossval``:

- grid: every (threshold, minimum lesion size in mm3) pair; the sizes grow with the data's
  lesions (:func:`min_size_grid`);
- crop: each case is first cropped to the box holding its reference and every voxel the lowest
  threshold marks (same scores, a fraction of the voxels: a brain tumour case is 9 million);
- score (:func:`score`): per grid point, each case's probabilities are thresholded, lesions
  below the size removed, and the masks scored against the references: pooled lesion recall,
  precision and F1 (counts summed over cases) and the mean voxel Dice over cases with a lesion
  in either mask;
- criterion: the harmonic mean of pooled lesion F1 and mean Dice. Not F1 alone: under
  any-overlap matching (ISLES'22, the default) a low threshold that merges every lesion into
  one blob detects them all with a single true-positive prediction, so F1 alone is maximised
  by a useless mask; Dice alone ignores small lesions. Not their arithmetic mean either: the
  blob's F1 near 1 outweighed its Dice near 0 (an undertrained demo model was tuned to 0.10,
  lesion F1 0.991 and Dice 0.007, over 0.50's F1 0.310 and Dice 0.390); the harmonic mean is
  near 0 when either term is;
- ties: the threshold nearer 0.5, then the smaller minimum size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from segmenter.evaluation import metrics
from segmenter.evaluation.components import bounding_box, lesion_volumes_mm3
from segmenter.evaluation.lesions import LesionRule
from segmenter.evaluation.postprocess import probabilities_to_mask

#: Thresholds tried by default.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.10 .. 0.90
#: Minimum lesion sizes (mm3) the out-of-fold tuning always tries (:func:`min_size_grid`).
MIN_SIZES_MM3 = (0.0, 2.0, 5.0, 10.0, 20.0, 50.0)
#: :func:`min_size_grid` goes on up to this fraction of the median reference lesion volume.
MIN_SIZE_FRACTION = 0.1
CRITERION = "harmonic mean of pooled lesion F1 and mean voxel Dice"


def masks_at(
    probabilities: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    threshold: float,
    min_lesion_mm3: float,
) -> list[np.ndarray]:
    """Each case's ``(X, Y, Z)`` probabilities thresholded, lesions below the size removed."""
    return [
        probabilities_to_mask(p, s, threshold=threshold, min_lesion_mm3=min_lesion_mm3)
        for p, s in zip(probabilities, spacings, strict=True)
    ]


def lesion_counts(
    masks: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    rule: LesionRule,
) -> dict[str, int]:
    """Lesion counts summed over cases: ``tp``, ``fp``, ``fn`` (reference side) and
    ``tp_pred``, ``n_pred`` (predicted side)."""
    counts = dict.fromkeys(("tp", "fp", "fn", "tp_pred", "n_pred"), 0)
    for pred, ref, spacing in zip(masks, references, spacings, strict=True):
        s = metrics.lesion_metrics(pred, ref, spacing, rule=rule).summary
        for key in counts:
            counts[key] += s[key]
    return counts


def _harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)``, 0 when both are 0."""
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def score(
    masks: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    rule: LesionRule,
) -> dict[str, float]:
    """Pooled lesion recall / precision / F1, mean Dice, and the criterion, over cases."""
    c = lesion_counts(masks, references, spacings, rule)
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    dices = [d for d in (metrics.dice(p, r) for p, r in zip(masks, references, strict=True))
             if not math.isnan(d)]  # fmt: skip
    denom = tp + 0.5 * (fp + fn)
    f1 = tp / denom if denom else math.nan
    dice = float(np.mean(dices)) if dices else math.nan
    both = [0.0 if math.isnan(v) else v for v in (f1, dice)]  # an undefined term counts 0
    return {
        "f1": f1,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "precision": c["tp_pred"] / c["n_pred"] if c["n_pred"] else math.nan,
        "dice": dice,
        "criterion": round(_harmonic_mean(both[0], both[1]), 6),
    }


def min_size_grid(
    references: Sequence[np.ndarray], spacings: Sequence[Sequence[float]], rule: LesionRule
) -> tuple[float, ...]:
    """Minimum lesion sizes to try: :data:`MIN_SIZES_MM3`, then 100, 200, 500, 1000, ... mm3
    up to :data:`MIN_SIZE_FRACTION` of the median volume of the references' lesions that count
    under ``rule`` (larger than its ``min_ref_mm3``; BraTS 2023 ignores those of 50 mm3 or
    less, and whole-tumour labels carry many such specks beside each tumour).

    Small-lesion data (MS: median lesion tens of mm3) keep the fixed grid; large-lesion data
    (a whole brain tumour: tens of ml, where false positives are blobs of hundreds of mm3)
    get sizes that can remove those blobs without touching a real lesion.
    """
    volumes = [
        v
        for r, s in zip(references, spacings, strict=True)
        for v in lesion_volumes_mm3(r, s)
        if v > rule.min_ref_mm3
    ]
    grid = list(MIN_SIZES_MM3)
    if not volumes:
        return tuple(grid)
    top = MIN_SIZE_FRACTION * float(np.median(volumes))
    decade = 100.0
    while True:
        for step in (1.0, 2.0, 5.0):
            if decade * step > top:
                return tuple(grid)
            grid.append(decade * step)
        decade *= 10.0


def _candidate_box(
    probabilities: np.ndarray, reference: np.ndarray, lowest: float, margin: int
) -> tuple[slice, ...]:
    """Box around every voxel a grid point can mark (``>= lowest``) and the reference, + margin.

    Outside it every mask of the grid and the reference are 0, so scores are the same on the
    crop (the margin keeps BraTS's reference dilation unclipped, as
    :mod:`segmenter.evaluation.metrics`).
    """
    box = bounding_box((probabilities >= lowest) | (reference > 0), margin)
    return (slice(0, 1),) * 3 if box is None else box


def grid_search(
    probabilities: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    rule: LesionRule,
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    min_sizes_mm3: Sequence[float] = (0.0,),
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Best (threshold, min size) by the criterion, and one row per grid point.

    Args:
        probabilities: per case ``(X, Y, Z)`` foreground probabilities.
        references: per case ``(X, Y, Z)`` binary references on the same grid.
        spacings: voxel sizes in mm.
        rule: lesion matching rule.
        thresholds: thresholds to try, each in (0, 1).
        min_sizes_mm3: minimum lesion sizes to try.

    Returns:
        ``(best row, rows)``; a row holds ``threshold``, ``min_lesion_mm3`` and :func:`score`'s
        keys.

    Raises:
        ValueError: no cases or an empty grid.
    """
    if not probabilities or not thresholds or not min_sizes_mm3:
        raise ValueError("grid_search needs cases, thresholds and minimum sizes")
    margin = rule.dilation_iters + 1
    boxes = [
        _candidate_box(p, r, min(thresholds), margin)
        for p, r in zip(probabilities, references, strict=True)
    ]
    probabilities = [np.ascontiguousarray(p[b]) for p, b in zip(probabilities, boxes, strict=True)]
    references = [np.ascontiguousarray(r[b]) for r, b in zip(references, boxes, strict=True)]
    rows: list[dict[str, float]] = []
    for thr in thresholds:
        for size in min_sizes_mm3:
            masks = [
                probabilities_to_mask(p, s, threshold=thr, min_lesion_mm3=size)
                for p, s in zip(probabilities, spacings, strict=True)
            ]
            rows.append({"threshold": thr, "min_lesion_mm3": size,
                         **score(masks, references, spacings, rule)})  # fmt: skip

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        return (r["criterion"], -abs(r["threshold"] - 0.5), -r["min_lesion_mm3"])

    return max(rows, key=key), rows
