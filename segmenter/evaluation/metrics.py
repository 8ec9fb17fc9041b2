"""Segmentation metrics: voxel overlap, surface distance (HD95) and lesion-wise detection.

Pure numpy functions on binary masks; no file I/O, no torch. Inputs are ``(X, Y, Z)`` arrays of
bool or 0/1 values (any integer or float dtype) with the same shape, and the voxel size in mm
along the same axes. Sizes are reported in mm3 / ml from that spacing, never in voxels.

- :func:`voxel_metrics`: Dice, IoU, precision, recall, voxel counts (nnU-Net's keys), HD95 and
  the absolute volume difference in ml (ISLES'22 AVD).
- :func:`hd95`: 95th-percentile Hausdorff distance in mm, MONAI's convention: surface voxels are
  mask voxels with a 6-neighbour outside the mask (the image border counts as outside),
  distances are Euclidean between surface voxel centres in mm, and the result is the larger of
  the two directed 95th percentiles (numpy's linear interpolation), as
  ``monai.metrics.compute_hausdorff_distance(percentile=95)`` and the DeepMind
  ``surface_distance.compute_robust_hausdorff`` used by BraTS (which additionally weights by
  surfel area, so BraTS's own values can differ slightly).
- :func:`lesion_metrics`: lesion recall, precision, F1, per-lesion Dice, false-positive
  lesions, lesion count difference and recall by lesion-size bin, under a
  :class:`~segmenter.evaluation.lesions.LesionRule` (presets ``isles22`` (default), ``atlas``,
  ``brats23``, ``msseg``, ``panoptica``; the matching engine and its rules live in
  :mod:`segmenter.evaluation.lesions`).

Empty cases follow :data:`EMPTY_POLICY` (NaN where a ratio has no denominator, as nnU-Net), which
the evaluator writes into ``summary.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from segmenter.evaluation.components import bounding_box
from segmenter.evaluation.lesions import (
    FN,
    FP,
    IGNORED,
    PRESETS,
    TP,
    LesionRule,
    Matching,
    match_lesions,
    rule_to_dict,
)

__all__ = [
    "DEFAULT_SIZE_BINS_MM3",
    "EMPTY_POLICY",
    "dice",
    "PRESETS",
    "LesionRecord",
    "LesionResult",
    "LesionRule",
    "hd95",
    "lesion_metrics",
    "rule_to_dict",
    "size_bin_labels",
    "voxel_metrics",
]

DEFAULT_SIZE_BINS_MM3: tuple[float, ...] = (0.0, 10.0, 100.0, 1000.0, math.inf)
"""Lesion-size bin edges in mm3; a lesion of volume v falls in the bin ``lo <= v < hi``."""

EMPTY_POLICY: dict[str, str] = {
    "Dice, IoU": "NaN when reference and prediction are both empty (nnU-Net); 0 when only one is",
    "precision": "voxel precision NaN when the prediction is empty",
    "recall": "voxel recall NaN when the reference is empty",
    "HD95": "NaN when the reference or the prediction is empty",
    "volume_diff_ml": "always defined (0 when both are empty)",
    "lesion recall": "NaN when the case has no reference lesion (after size limits)",
    "lesion precision": "NaN when the case has no predicted lesion (after size limits)",
    "lesion f1": "NaN when the case has neither reference nor predicted lesions; 0 when only one "
    "side has lesions",
    "lesion_dice": "NaN when the case has no reference lesion; a missed lesion counts 0",
    "recall_by_size": "NaN for a bin without reference lesions",
    "RQ, SQ, PQ": "RQ = f1, SQ = mean IoU of the matches, PQ = SQ * RQ; all NaN when the case "
    "has no lesion at all, SQ 0 when it has lesions but no match (panoptica)",
    "lesionwise_dice, lesionwise_hd95 (brats23)": "1 and 0 when the case has neither a counted "
    "reference lesion nor a false-positive lesion (BraTS 2023 convention); a missed lesion and "
    "each false-positive lesion count Dice 0 / HD95 374 mm",
}


@dataclass(frozen=True)
class LesionRecord:
    """One reference or predicted lesion (a ``lesions.csv`` row).

    Attributes:
        source: ``"ref"`` or ``"pred"``.
        id: component label, 1..n in C raster order of the array (per source).
        volume_mm3: lesion volume.
        centroid_vox: centre of mass in voxel coordinates of the input array.
        matched: ids of the lesions of the other source it matches (under the Anima rule: the
            ones it overlaps, detected or not).
        dice: Dice with the union of its matched lesions; 0 when missed or false, NaN when
            ignored.
        status: ``"TP"``, ``"FN"`` (reference), ``"FP"`` (prediction) or ``"ignored"`` (below
            the rule's size limit, or a prediction touching only ignored reference lesions).
        hd95: per-lesion HD95 in mm (reference lesions, rules with ``hd95_penalty_mm``), else NaN.
    """

    source: str
    id: int
    volume_mm3: float
    centroid_vox: tuple[float, float, float]
    matched: tuple[int, ...]
    dice: float
    status: str
    hd95: float = math.nan


@dataclass(frozen=True)
class LesionResult:
    """Lesion-wise result of one case.

    Attributes:
        summary: ``n_ref``, ``n_pred`` (counted lesions), ``tp`` (detected reference lesions),
            ``fp`` (false predicted lesions), ``fn`` (missed reference lesions), ``tp_pred``
            (true predicted lesions), ``recall`` = tp / n_ref, ``precision`` = tp_pred / n_pred,
            ``f1`` (rule's formula), ``lesion_dice`` (mean per-lesion Dice over reference
            lesions), ``fp_per_case`` (= fp), ``count_diff`` = abs(n_pred - n_ref),
            ``count_diff_signed``, ``recall_by_size`` (bin label -> ``n``, ``detected``,
            ``recall``); one-to-one rules add ``RQ``, ``SQ``, ``PQ``; rules with
            ``hd95_penalty_mm`` add ``lesion_hd95``, ``lesionwise_dice``, ``lesionwise_hd95``.
        lesions: one record per reference lesion, then one per predicted lesion.

    A prediction split into pieces or bridging lesions makes the number of detected reference
    lesions (``tp``) differ from the number of true predicted lesions (``tp_pred``): recall and
    ``tp``/``fn`` count reference lesions, precision and ``fp`` count predicted lesions, and the
    ISLES'22 F1 = tp / (tp + (fp + fn) / 2) mixes them, so it is not the harmonic mean of the
    reported precision and recall (the ``"harmonic"`` formula of the ``msseg`` preset is).
    """

    summary: dict[str, Any]
    lesions: list[LesionRecord]


def _spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {tuple(spacing)}")
    return sp  # type: ignore[return-value]


def _foreground(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(array, foreground mask); the binary check happens on the cropped foreground."""
    a = np.asarray(x)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3D (X, Y, Z) array, got shape {a.shape}")
    if a.dtype == np.bool_:
        return a, a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a binary mask (bool or 0/1), got dtype {a.dtype}")
    return a, a != 0


def _crop_pair(
    pred: np.ndarray, ref: np.ndarray, margin: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Validate two masks and crop both to their joint foreground box (+ margin, clipped).

    Returns:
        C-contiguous bool crops of pred and ref, and the crop's offset in the input. Both crops
        have shape (0, 0, 0) when the two masks are empty.
    """
    (pa, pm), (ra, rm) = _foreground(pred, "pred"), _foreground(ref, "ref")
    if pa.shape != ra.shape:
        raise ValueError(f"pred and ref shapes differ: {pa.shape} vs {ra.shape}")
    boxes = [b for b in (bounding_box(pm, margin), bounding_box(rm, margin)) if b is not None]
    if not boxes:
        empty = np.zeros((0, 0, 0), dtype=bool)
        return empty, empty, (0, 0, 0)
    box = tuple(
        slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes))
        for axis in range(3)
    )
    crops = []
    for name, a, m in (("pred", pa, pm), ("ref", ra, rm)):
        mc = np.ascontiguousarray(m[box])
        if a is not m:
            bad = (a[box] != 1) & mc
            if bad.any():
                value = a[box][bad].flat[0]
                raise ValueError(f"{name} must be a binary mask (0/1), found value {value}")
        crops.append(mc)
    return crops[0], crops[1], (box[0].start, box[1].start, box[2].start)


def _surface_points(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """(n, 3) mm coordinates of the voxels with a 6-neighbour outside the mask."""
    p = np.pad(mask, 1)
    core = p[1:-1, 1:-1, 1:-1]
    interior = core.copy()
    for axis in range(3):
        for start in (0, 2):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(start, start + core.shape[axis])
            interior &= p[tuple(sl)]
    return np.argwhere(core & ~interior) * np.asarray(spacing)


def _hd(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float], q: float) -> float:
    pa, pb = _surface_points(a, spacing), _surface_points(b, spacing)
    if len(pa) == 0 or len(pb) == 0:
        return math.nan
    d_ab = cKDTree(pb).query(pa)[0]
    d_ba = cKDTree(pa).query(pb)[0]
    return float(max(np.percentile(d_ab, q), np.percentile(d_ba, q)))


def hd95(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], percentile: float = 95.0
) -> float:
    """Percentile Hausdorff distance between two masks, in mm (MONAI convention, module doc).

    Args:
        pred: (X, Y, Z) binary mask.
        ref: (X, Y, Z) binary mask, same shape.
        spacing: voxel size in mm along X, Y, Z.
        percentile: 95 for HD95, 100 for the Hausdorff distance.

    Returns:
        The distance in mm; NaN when either mask is empty.
    """
    sp = _spacing(spacing)
    pred_c, ref_c, _ = _crop_pair(pred, ref)
    return _hd(pred_c, ref_c, sp, percentile)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Voxel Dice of two binary masks (Sørensen 1948; Dice 1945); NaN when both are empty.

    The overlap term of :func:`voxel_metrics` alone, without HD95, for loops over thresholds.

    Raises:
        ValueError: shapes differ, not 3D, or not binary.
    """
    pred_c, ref_c, _ = _crop_pair(pred, ref)
    tp = int(np.count_nonzero(pred_c & ref_c))
    total = int(np.count_nonzero(pred_c)) + int(np.count_nonzero(ref_c))
    return 2 * tp / total if total else math.nan


def voxel_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Voxel-wise overlap, HD95 and volume metrics of one binary mask pair.

    Args:
        pred: (X, Y, Z) binary predicted mask (bool or 0/1).
        ref: (X, Y, Z) binary reference mask, same shape.
        spacing: voxel size in mm along X, Y, Z.

    Returns:
        ``Dice``, ``IoU``, ``precision``, ``recall``, ``HD95`` (mm), ``TP``, ``FP``, ``FN``,
        ``TN``, ``n_pred``, ``n_ref`` (voxel counts, nnU-Net's keys), ``volume_pred_ml``,
        ``volume_ref_ml`` and ``volume_diff_ml`` = abs(pred - ref) volume in ml (ISLES'22 AVD).
        Empty masks: see :data:`EMPTY_POLICY`.

    Raises:
        ValueError: shapes differ, not 3D, not binary, or bad spacing.
    """
    sp = _spacing(spacing)
    pred_c, ref_c, _ = _crop_pair(pred, ref)
    tp = int(np.count_nonzero(pred_c & ref_c))
    n_pred, n_ref = int(np.count_nonzero(pred_c)), int(np.count_nonzero(ref_c))
    fp, fn = n_pred - tp, n_ref - tp
    ml = float(np.prod(sp)) / 1000.0

    def ratio(num: float, den: float) -> float:
        return num / den if den else math.nan

    return {
        "Dice": ratio(2 * tp, n_pred + n_ref),
        "IoU": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, n_pred),
        "recall": ratio(tp, n_ref),
        "HD95": _hd(pred_c, ref_c, sp, 95.0),
        "TP": tp,
        "FP": fp,
        "FN": fn,
        "TN": int(np.prod(np.shape(pred))) - tp - fp - fn,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "volume_pred_ml": n_pred * ml,
        "volume_ref_ml": n_ref * ml,
        "volume_diff_ml": abs(n_pred - n_ref) * ml,
    }


def _bins(edges: Sequence[float]) -> tuple[float, ...]:
    e = tuple(float(v) for v in edges)
    if (
        len(e) < 2
        or any(math.isnan(v) for v in e)
        or e[0] < 0
        or any(b <= a for a, b in zip(e, e[1:], strict=False))
    ):
        raise ValueError(f"size bins must be >= 2 increasing edges >= 0 in mm3, got {edges}")
    return e


def size_bin_labels(edges: Sequence[float]) -> list[str]:
    """Labels of the bins ``lo <= v < hi``: ``(0, 10, inf)`` -> ``["0-10", "10-inf"]``."""
    e = _bins(edges)
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(e, e[1:], strict=False)]


def _recall_by_size(
    volumes: np.ndarray, detected: np.ndarray, edges: tuple[float, ...]
) -> dict[str, dict[str, Any]]:
    which = np.searchsorted(np.asarray(edges), volumes, side="right") - 1
    out = {}
    for i, label in enumerate(size_bin_labels(edges)):
        in_bin = which == i
        n, hit = int(in_bin.sum()), int((in_bin & detected).sum())
        out[label] = {"n": n, "detected": hit, "recall": hit / n if n else math.nan}
    return out


def _lesion_hd95(m: Matching, r: int, spacing: tuple[float, float, float], miss: float) -> float:
    """HD95 between reference lesion r and the union of its matched predictions (bbox crop)."""
    preds = m.ref_matched[r - 1]
    if not preds:
        return miss
    ids = np.asarray(preds)
    boxes = np.vstack([m.ref.bboxes[r - 1], m.pred.bboxes[ids - 1]])
    box = tuple(
        slice(lo, hi) for lo, hi in zip(boxes[:, :3].min(0), boxes[:, 3:].max(0), strict=True)
    )
    return _hd(np.isin(m.pred.labels[box], ids), m.ref.labels[box] == r, spacing, 95.0)


def _lesion_f1(
    rule: LesionRule, n_ref: int, n_pred: int, tp: int, fp: int, fn: int, rates: tuple[float, float]
) -> float:
    """Lesion F1 by :attr:`LesionRule.f1` (ISLES'22 counts or Anima's harmonic mean of
    ``rates`` = (recall, precision)); NaN when the case has no lesion on either side."""
    if n_ref + n_pred == 0:
        return math.nan
    if rule.f1 == "counts":
        return tp / (tp + 0.5 * (fp + fn))
    recall, precision = rates
    if n_ref == 0 or n_pred == 0 or precision + recall == 0:
        return 0.0  # Anima divides 0 by 0 here; a case with lesions and no detection scores 0
    return 2 * precision * recall / (precision + recall)


def _panoptic_quality(match_iou: np.ndarray, f1: float, n_lesions: int) -> dict[str, float]:
    """RQ, SQ and PQ of a one-to-one matching (Kirillov et al. 2019; panoptica's conventions)."""
    # panoptica's zero-TP convention: SQ 0 when lesions exist but none matched
    sq = float(match_iou.mean()) if match_iou.size else (0.0 if n_lesions else math.nan)
    return {"RQ": f1, "SQ": sq, "PQ": sq * f1}


def _brats_lesionwise(
    dice: np.ndarray, hd95: np.ndarray, fp: int, penalty_mm: float
) -> dict[str, float]:
    """BraTS 2023 lesion-wise means: each false-positive lesion adds Dice 0 / HD95 penalty.

    Args:
        dice: (n_ref,) per-lesion Dice of the counted reference lesions.
        hd95: (n_ref,) their per-lesion HD95 in mm (a missed lesion holds the penalty).
        fp: number of false-positive lesions.
        penalty_mm: HD95 of a false-positive lesion.
    """
    n_ref = dice.shape[0]
    denom = n_ref + fp
    return {
        "lesion_hd95": float(hd95.mean()) if n_ref else math.nan,
        "lesionwise_dice": float(dice.sum()) / denom if denom else 1.0,
        "lesionwise_hd95": (float(hd95.sum()) + fp * penalty_mm) / denom if denom else 0.0,
    }


def _summary(
    m: Matching,
    rule: LesionRule,
    bins: tuple[float, ...],
    voxel_mm3: float,
    ref_hd95: np.ndarray,
) -> dict[str, Any]:
    """The :attr:`LesionResult.summary` of one matching (keys in ``summary.json`` order)."""
    ref_status, pred_status = np.asarray(m.ref_status), np.asarray(m.pred_status)
    counted_ref = ref_status != IGNORED
    n_ref, tp = int(counted_ref.sum()), int((ref_status == TP).sum())
    fn = int((ref_status == FN).sum())
    fp, tp_pred = int((pred_status == FP).sum()), int((pred_status == TP).sum())
    n_pred = fp + tp_pred
    recall = tp / n_ref if n_ref else math.nan
    precision = tp_pred / n_pred if n_pred else math.nan
    f1 = _lesion_f1(rule, n_ref, n_pred, tp, fp, fn, (recall, precision))
    dice = m.ref_dice[counted_ref]
    out: dict[str, Any] = {
        "n_ref": n_ref,
        "n_pred": n_pred,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tp_pred": tp_pred,
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "lesion_dice": float(dice.mean()) if n_ref else math.nan,
        "fp_per_case": fp,
        "count_diff": abs(n_pred - n_ref),
        "count_diff_signed": n_pred - n_ref,
        "recall_by_size": _recall_by_size(
            m.ref.sizes[counted_ref] * voxel_mm3, ref_status[counted_ref] == TP, bins
        ),
    }
    if rule.one_to_one:
        out.update(_panoptic_quality(m.match_iou, f1, n_ref + n_pred))
    if rule.hd95_penalty_mm is not None:
        out.update(_brats_lesionwise(dice, ref_hd95[counted_ref], fp, rule.hd95_penalty_mm))
    return out


def _resolve_rule(rule: LesionRule | str) -> LesionRule:
    """The rule itself, or the preset of that name."""
    if isinstance(rule, str):
        if rule not in PRESETS:
            raise ValueError(f"unknown lesion preset {rule!r}; valid: {', '.join(PRESETS)}")
        return PRESETS[rule]
    if not isinstance(rule, LesionRule):
        raise TypeError(f"rule must be a LesionRule or a preset name, got {type(rule).__name__}")
    return rule


def _reference_hd95(
    m: Matching, spacing: tuple[float, float, float], rule: LesionRule
) -> np.ndarray:
    """(n_ref,) per-lesion HD95 of the counted reference lesions; NaN elsewhere or unasked."""
    ref_hd95 = np.full(m.ref.n, math.nan)
    if rule.hd95_penalty_mm is not None:
        for i, status in enumerate(m.ref_status):
            if status != IGNORED:
                ref_hd95[i] = _lesion_hd95(m, i + 1, spacing, rule.hd95_penalty_mm)
    return ref_hd95


def _records(
    m: Matching, offset: tuple[int, int, int], voxel_mm3: float, ref_hd95: np.ndarray
) -> list[LesionRecord]:
    """One record per reference lesion, then per predicted lesion; centroids in input voxels."""
    shift = np.asarray(offset, dtype=np.float64)
    records = []
    for source, comp, status, matched, dice, hd in (
        ("ref", m.ref, m.ref_status, m.ref_matched, m.ref_dice, ref_hd95),
        ("pred", m.pred, m.pred_status, m.pred_matched, m.pred_dice, np.full(m.pred.n, math.nan)),
    ):
        volumes = (comp.sizes * voxel_mm3).tolist()
        centroids = (comp.centroids + shift).tolist()
        for i in range(comp.n):
            records.append(
                LesionRecord(
                    source=source,
                    id=i + 1,
                    volume_mm3=volumes[i],
                    centroid_vox=tuple(centroids[i]),
                    matched=matched[i],
                    dice=math.nan if status[i] == IGNORED else float(dice[i]),
                    status=status[i],
                    hd95=float(hd[i]),
                )
            )
    return records


def lesion_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    rule: LesionRule | str = PRESETS["isles22"],
    size_bins_mm3: Sequence[float] = DEFAULT_SIZE_BINS_MM3,
) -> LesionResult:
    """Lesion-wise detection metrics of one case.

    Args:
        pred: (X, Y, Z) binary predicted mask (bool or 0/1).
        ref: (X, Y, Z) binary reference mask, same shape.
        spacing: voxel size in mm along X, Y, Z (lesion volumes, size limits, HD95).
        rule: a :class:`LesionRule` or a preset name from :data:`PRESETS`.
        size_bins_mm3: increasing bin edges for recall by reference-lesion volume.

    Returns:
        Summary counts and rates (see :class:`LesionResult`) and one record per lesion.

    Raises:
        ValueError: shapes differ, not 3D, not binary, bad spacing, bins or preset name.
        TypeError: ``rule`` is neither a :class:`LesionRule` nor a preset name.
    """
    rule = _resolve_rule(rule)
    bins = _bins(size_bins_mm3)
    sp = _spacing(spacing)
    margin = rule.dilation_iters + 1 if rule.dilation_iters else 0
    pred_c, ref_c, offset = _crop_pair(pred, ref, margin)
    m = match_lesions(pred_c, ref_c, sp, rule)
    voxel_mm3 = float(np.prod(sp))
    ref_hd95 = _reference_hd95(m, sp, rule)
    return LesionResult(
        _summary(m, rule, bins, voxel_mm3, ref_hd95), _records(m, offset, voxel_mm3, ref_hd95)
    )
