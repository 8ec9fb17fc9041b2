"""Post-processing tuned on held-out probabilities: threshold and minimum lesion size.

One grid search serves the per-fold threshold tuning at the end of training and the
out-of-fold tuning of ``segmenter crossval``. For every (threshold, minimum lesion size in mm3)
pair of the grid, each case's probabilities are thresholded, lesions below the size removed,
and the masks scored against the references: pooled lesion recall, precision and F1 (counts
summed over cases) and the mean voxel Dice over cases with a lesion in either mask.

The criterion is the mean of pooled lesion F1 and mean Dice, not lesion F1 alone: under
any-overlap matching (ISLES'22, the default) a low threshold that merges every lesion into one
large blob detects them all with a single true-positive prediction, so F1 alone is maximised by
a useless mask; Dice alone ignores small lesions. Ties go to the threshold nearer 0.5, then to
the smaller minimum size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from segmenter import metrics
from segmenter.lesions import LesionRule
from segmenter.postprocess import probabilities_to_mask

#: Thresholds tried by default.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.10 .. 0.90
#: Minimum lesion sizes (mm3) tried by default by the out-of-fold tuning.
MIN_SIZES_MM3 = (0.0, 2.0, 5.0, 10.0, 20.0, 50.0)
CRITERION = "mean of pooled lesion F1 and mean voxel Dice"


def score(
    masks: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    rule: LesionRule,
) -> dict[str, float]:
    """Pooled lesion recall / precision / F1, mean Dice, and the criterion, over cases."""
    tp = fp = fn = tp_pred = n_pred = 0
    dices = []
    for pred, ref, spacing in zip(masks, references, spacings, strict=True):
        s = metrics.lesion_metrics(pred, ref, spacing, rule=rule).summary
        tp, fp, fn = tp + s["tp"], fp + s["fp"], fn + s["fn"]
        tp_pred, n_pred = tp_pred + s["tp_pred"], n_pred + s["n_pred"]
        d = metrics.dice(pred, ref)
        if not math.isnan(d):
            dices.append(d)
    denom = tp + 0.5 * (fp + fn)
    f1 = tp / denom if denom else math.nan
    dice = float(np.mean(dices)) if dices else math.nan
    both = [0.0 if math.isnan(v) else v for v in (f1, dice)]  # an undefined term counts 0
    return {
        "f1": f1,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "precision": tp_pred / n_pred if n_pred else math.nan,
        "dice": dice,
        "criterion": round(0.5 * (both[0] + both[1]), 6),
    }


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
