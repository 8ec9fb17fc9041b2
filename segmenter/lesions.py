"""Lesion matching engine: connected components, one overlap table, the challenges' matching rules.

A lesion is a connected component of a binary mask. :func:`match_lesions` labels both masks
(cc3d), then builds the sparse table of voxel overlaps between reference and predicted lesions
in one pass over the voxels where both are foreground. Every rule below is decided on that table
(hundreds of entries), never again on the volume, so a case with 400 lesions costs about as much
as one with 4.

Rules (:attr:`LesionRule.match`), each cited to the code that defines it:

- ``"overlap"``: a reference lesion is detected if any predicted voxel overlaps it; a predicted
  lesion is false if it overlaps no reference voxel (ISLES'22 ``compute_lesion_f1_score``,
  de la Rosa et al.; ATLAS R2.0, Liew et al. 2022, with 6-connectivity). With
  ``dilation_iters > 0`` it is the BraTS 2023 lesion-wise rule (github.com/rachitsaluja/
  BraTS-2023-Metrics): the reference mask is dilated ``dilation_iters`` times with the
  18-connected structure, reference components whose dilations touch are merged into one lesion,
  and a predicted component matches a reference lesion if it touches the lesion's dilation.
- ``"iou"`` / ``"dice"``: one-to-one, greedy best-first: candidate pairs sorted by score
  (descending; ties by predicted id, then reference id, as panoptica's ``NaiveThresholdMatching``)
  are accepted while the score is ``>= threshold`` and neither lesion is taken yet (Kirillov et
  al., Panoptic Segmentation, CVPR 2019; panoptica, Kofler et al. 2023).
- ``"anima"``: Anima's ``animaSegPerfAnalyzer`` rule used by MSSEG 2016 (Commowick et al.,
  Sci Rep 2018, section "Detection"; ``SegPerfCAnalyzer::getTruePositiveLesions`` and
  ``falsePositiveRatioTester``). A reference lesion R is detected if (a) the fraction of R covered
  by predicted lesions is > ``alpha``, and (b) walking the predicted lesions that overlap R in
  decreasing order of overlap, each one visited before their overlaps add up to ``gamma`` of R's
  covered voxels (the one that reaches ``gamma`` included) has at most ``beta`` of its own
  voxels outside every reference lesion. A predicted lesion is a true positive under the same
  test with the roles swapped. As in Anima, the walk visits at most (number of lesions on the
  tested side + 1) candidates and stops without failing when it runs out; ties in overlap are
  visited in increasing id order (Anima's ``std::sort`` leaves them unspecified).

Lesions at or below the size limits (``volume <= min_*_mm3``; Anima and BraTS both keep
strictly larger lesions) are excluded. Small predicted lesions are always removed (treated as
background). Small reference lesions are removed too by default (Anima), or, with
``small_ref="ignore"`` (BraTS 2023), stay in the matching (a prediction touching one is not a
false positive) but are left out of every count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import ndimage

from segmenter.components import component_sizes, label_components

TP, FN, FP, IGNORED = "TP", "FN", "FP", "ignored"
MATCH_RULES = ("overlap", "iou", "dice", "anima")
SMALL_REF_POLICIES = ("remove", "ignore")
F1_FORMULAS = ("counts", "harmonic")


@dataclass(frozen=True)
class LesionRule:
    """How lesions are defined and matched. Presets in :data:`PRESETS`.

    Attributes:
        connectivity: 6, 18 or 26; neighbourhood defining a connected component (lesion).
        min_ref_mm3: reference lesions with volume <= this (mm3) are excluded (0 keeps all).
        min_pred_mm3: predicted lesions with volume <= this (mm3) are removed (0 keeps all).
        small_ref: ``"remove"`` small reference lesions (their voxels become background) or
            ``"ignore"`` them (they still absorb predictions but are not counted).
        match: ``"overlap"``, ``"iou"``, ``"dice"`` or ``"anima"`` (module docstring).
        threshold: minimum IoU / Dice of a one-to-one match (``"iou"`` / ``"dice"`` only).
        dilation_iters: BraTS 2023 dilated matching, in 18-connected dilation steps (voxels, not
            mm, as BraTS: 3 for GLI/SSA/PED, 1 for MEN/MET); 0 disables. ``"overlap"`` only.
        alpha: Anima minimum covered fraction (strictly greater passes).
        beta: Anima maximum fraction of a contributing lesion lying outside the other mask.
        gamma: Anima share of the overlap whose contributors are checked against ``beta``.
        f1: ``"counts"``: TP / (TP + (FP + FN) / 2) with TP = detected reference lesions,
            FP = false predicted lesions, FN = missed reference lesions (ISLES'22);
            ``"harmonic"``: 2 P R / (P + R) of lesion precision and recall (Anima).
        hd95_penalty_mm: when set, per-lesion HD95 is computed, a missed lesion scores this
            value, and the summary gains BraTS 2023 lesion-wise Dice / HD95 in which every
            false-positive lesion adds Dice 0 / HD95 = this value (374 in BraTS).
    """

    connectivity: int = 26
    min_ref_mm3: float = 0.0
    min_pred_mm3: float = 0.0
    small_ref: str = "remove"
    match: str = "overlap"
    threshold: float = 0.0
    dilation_iters: int = 0
    alpha: float = 0.10
    beta: float = 0.70
    gamma: float = 0.65
    f1: str = "counts"
    hd95_penalty_mm: float | None = None

    def __post_init__(self) -> None:
        def bad(field: str, valid: str) -> ValueError:
            return ValueError(f"LesionRule.{field}={getattr(self, field)!r}: expected {valid}")

        if self.connectivity not in (6, 18, 26):
            raise bad("connectivity", "6, 18 or 26")
        if self.match not in MATCH_RULES:
            raise bad("match", " | ".join(MATCH_RULES))
        if self.small_ref not in SMALL_REF_POLICIES:
            raise bad("small_ref", " | ".join(SMALL_REF_POLICIES))
        if self.f1 not in F1_FORMULAS:
            raise bad("f1", " | ".join(F1_FORMULAS))
        for name in ("min_ref_mm3", "min_pred_mm3"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, "a finite volume >= 0 (mm3)")
        if not 0.0 <= self.threshold <= 1.0:
            raise bad("threshold", "a value in [0, 1]")
        if self.dilation_iters < 0 or int(self.dilation_iters) != self.dilation_iters:
            raise bad("dilation_iters", "an integer >= 0")
        if self.dilation_iters and self.match != "overlap":
            raise bad("dilation_iters", "0 unless match='overlap' (BraTS dilated matching)")
        for name in ("alpha", "beta", "gamma"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise bad(name, "a value in (0, 1] (Anima)")
        if self.match == "anima" and self.small_ref != "remove":
            raise bad("small_ref", "'remove' with match='anima' (Anima removes small lesions)")
        if self.hd95_penalty_mm is not None and not self.hd95_penalty_mm >= 0:
            raise bad("hd95_penalty_mm", "None or a distance >= 0 (mm)")

    @property
    def one_to_one(self) -> bool:
        """Whether each lesion matches at most one lesion (IoU/Dice rules: RQ, SQ, PQ apply)."""
        return self.match in ("iou", "dice")


PRESETS: Mapping[str, LesionRule] = MappingProxyType(
    {
        # ISLES'22 / WMH: 26-connectivity, any overlap detects, no size limit.
        "isles22": LesionRule(),
        # ATLAS R2.0: scipy.ndimage.label's default structure, i.e. 6-connectivity.
        "atlas": LesionRule(connectivity=6),
        # BraTS 2023 (GLI): 3 dilation steps, GT lesions <= 50 mm3 ignored, FP -> Dice 0 / HD95 374.
        "brats23": LesionRule(
            min_ref_mm3=50.0, small_ref="ignore", dilation_iters=3, hd95_penalty_mm=374.0
        ),
        # MSSEG 2016 (animaSegPerfAnalyzer defaults): 6-connectivity, lesions > 3 mm3 in both.
        "msseg": LesionRule(
            connectivity=6,
            min_ref_mm3=3.0,
            min_pred_mm3=3.0,
            match="anima",
            alpha=0.10,
            beta=0.70,
            gamma=0.65,
            f1="harmonic",
        ),  # fmt: skip
        # panoptica / panoptic quality: IoU >= 0.5, one-to-one.
        "panoptica": LesionRule(match="iou", threshold=0.5),
    }
)


def rule_to_dict(rule: LesionRule) -> dict[str, Any]:
    """The rule's fields as a plain dict (for ``summary.json``)."""
    return dataclasses.asdict(rule)


@dataclass(frozen=True)
class Components:
    """Connected components of one mask, on the (cropped) grid it was labelled on.

    Attributes:
        labels: (X, Y, Z) unsigned int, 0 background, k = component k (1..n, raster order).
        sizes: (n,) int64 voxel counts.
        centroids: (n, 3) float64 voxel coordinates.
        bboxes: (n, 6) int64 ``lo_x, lo_y, lo_z, hi_x, hi_y, hi_z`` (hi exclusive).
    """

    labels: np.ndarray
    sizes: np.ndarray
    centroids: np.ndarray
    bboxes: np.ndarray

    @property
    def n(self) -> int:
        """Number of components."""
        return int(self.sizes.shape[0])


@dataclass(frozen=True)
class Matching:
    """Result of :func:`match_lesions`; per-lesion arrays are indexed by id - 1.

    Attributes:
        ref: reference lesions (merged by dilation under BraTS matching).
        pred: predicted lesions.
        ref_status: ``"TP"`` (detected), ``"FN"`` or ``"ignored"`` (excluded by size).
        pred_status: ``"TP"``, ``"FP"`` or ``"ignored"`` (removed by size, or touching only
            ignored reference lesions).
        ref_matched: for each reference lesion, the ids of the predicted lesions matched to it
            (touching it, or its dilation for BraTS; overlapping it for Anima, detected or not).
        pred_matched: for each predicted lesion, the ids of the reference lesions it matches.
        ref_dice: Dice of each reference lesion with the union of its matched predictions;
            0 when it is not detected.
        pred_dice: the same for each predicted lesion; 0 for a false positive.
        match_iou: IoU of each one-to-one match between counted lesions (``"iou"``/``"dice"``
            rules; empty otherwise).
    """

    ref: Components
    pred: Components
    ref_status: tuple[str, ...]
    pred_status: tuple[str, ...]
    ref_matched: tuple[tuple[int, ...], ...]
    pred_matched: tuple[tuple[int, ...], ...]
    ref_dice: np.ndarray
    pred_dice: np.ndarray
    match_iou: np.ndarray


def _components(labels: np.ndarray, n: int) -> Components:
    """Sizes, centroids and bounding boxes from one pass over the foreground voxels."""
    flat = labels.reshape(-1)
    idx = np.flatnonzero(flat)
    ids = flat[idx].astype(np.intp)
    sizes = component_sizes(ids, n).astype(np.int64)
    coords = np.unravel_index(idx, labels.shape)
    centroids = np.zeros((n, 3))
    bboxes = np.zeros((n, 6), dtype=np.int64)
    if n:
        order = np.argsort(ids, kind="stable")
        starts = np.searchsorted(ids[order], np.arange(1, n + 1))
        for axis, c in enumerate(coords):
            centroids[:, axis] = np.bincount(ids, weights=c, minlength=n + 1)[1:] / sizes
            sorted_c = c[order]
            bboxes[:, axis] = np.minimum.reduceat(sorted_c, starts)
            bboxes[:, axis + 3] = np.maximum.reduceat(sorted_c, starts) + 1
    return Components(labels, sizes, centroids, bboxes)


def _pairs(
    a: np.ndarray, b: np.ndarray, both: np.ndarray, n_b: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a id, b id, voxel count) for every pair of overlapping components, ids 1-based."""
    idx = np.flatnonzero(both.reshape(-1))
    key = a.reshape(-1)[idx].astype(np.int64) * (n_b + 1) + b.reshape(-1)[idx]
    keys, counts = np.unique(key, return_counts=True)
    return keys // (n_b + 1), keys % (n_b + 1), counts.astype(np.int64)


def _group(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[tuple[int, ...], ...]:
    """For each key 1..n, the sorted values paired with it."""
    order = np.lexsort((values, keys))
    k, v = keys[order], values[order].tolist()
    bounds = np.searchsorted(k, np.arange(1, n + 2)).tolist()
    return tuple(tuple(v[bounds[i] : bounds[i + 1]]) for i in range(n))


def _union_dice(
    keys: np.ndarray,
    others: np.ndarray,
    inter_keys: np.ndarray,
    inter_counts: np.ndarray,
    sizes: np.ndarray,
    other_sizes: np.ndarray,
) -> np.ndarray:
    """Dice of each lesion with the union of the lesions matched to it (disjoint components).

    ``keys``/``others`` list the matched pairs; ``inter_*`` the voxel overlaps, all of which lie
    within matched pairs (an overlapping pair always matches under the overlap and Anima rules).
    """
    n = sizes.shape[0]
    inter = np.bincount(inter_keys, weights=inter_counts, minlength=n + 1)[1:]
    union = np.bincount(keys, weights=other_sizes[others - 1], minlength=n + 1)[1:]
    return 2.0 * inter / (sizes + union)


def _anima_detected(
    rows: np.ndarray,
    cols: np.ndarray,
    counts: np.ndarray,
    row_sizes: np.ndarray,
    col_sizes: np.ndarray,
    n_rows_kept: int,
    rule: LesionRule,
) -> np.ndarray:
    """Anima's detection test for every row lesion (``getTruePositiveLesions``).

    Args:
        rows, cols, counts: overlap table between kept lesions (1-based ids, counts > 0).
        row_sizes, col_sizes: voxel counts of every lesion (index id - 1).
        n_rows_kept: number of kept row lesions (bounds the walk, as Anima).
        rule: supplies alpha, beta, gamma.

    Returns:
        (n_rows,) bool, True where the row lesion is detected.
    """
    n_rows = row_sizes.shape[0]
    covered = np.bincount(rows, weights=counts, minlength=n_rows + 1)[1:]
    col_cov = np.bincount(cols, weights=counts, minlength=col_sizes.shape[0] + 1)[1:]
    col_outside = (col_sizes - col_cov) / col_sizes
    detected = np.zeros(n_rows, dtype=bool)
    order = np.lexsort((cols, -counts, rows))
    r_sorted, c_sorted, n_sorted = rows[order], cols[order].tolist(), counts[order].tolist()
    bounds = np.searchsorted(r_sorted, np.arange(1, n_rows + 2)).tolist()
    for r in range(1, n_rows + 1):
        lo, hi = bounds[r - 1], bounds[r]
        if lo == hi or not covered[r - 1] / row_sizes[r - 1] > rule.alpha:
            continue
        total, share, k, failed = covered[r - 1], 0.0, 0, False
        while share < rule.gamma and k < n_rows_kept + 1 and lo + k < hi and not failed:
            failed = col_outside[c_sorted[lo + k] - 1] > rule.beta
            if not failed:
                share += n_sorted[lo + k] / total
            k += 1
        detected[r - 1] = not failed
    return detected


def _greedy(
    r: np.ndarray, p: np.ndarray, n: np.ndarray, ref: Components, pred: Components, rule: LesionRule
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one best-first matching; returns matched (ref ids, pred ids, overlaps)."""
    rs, ps = ref.sizes[r - 1].astype(np.float64), pred.sizes[p - 1].astype(np.float64)
    nf = n.astype(np.float64)
    score = nf / (rs + ps - nf) if rule.match == "iou" else 2.0 * nf / (rs + ps)
    order = np.lexsort((r, p, -score))
    taken_r = np.zeros(ref.n + 1, dtype=bool)
    taken_p = np.zeros(pred.n + 1, dtype=bool)
    chosen = []
    for i in order.tolist():
        if score[i] < rule.threshold:
            break
        if taken_r[r[i]] or taken_p[p[i]]:
            continue
        taken_r[r[i]] = taken_p[p[i]] = True
        chosen.append(i)
    sel = np.asarray(chosen, dtype=np.intp)
    return r[sel], p[sel], n[sel]


def match_lesions(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], rule: LesionRule
) -> Matching:
    """Label both masks and match their lesions under ``rule``.

    Args:
        pred: (X, Y, Z) bool predicted mask, C-contiguous.
        ref: (X, Y, Z) bool reference mask, same shape. For BraTS matching the grid must extend
            at least ``rule.dilation_iters`` voxels beyond the reference foreground (or reach
            the array border), so that the dilation is not clipped.
        spacing: voxel size in mm, used for the size limits.
        rule: the matching rule.

    Returns:
        The lesions of both masks with their status, matches and per-lesion Dice.
    """
    voxel_mm3 = float(np.prod(spacing))
    if rule.dilation_iters:
        struct = ndimage.generate_binary_structure(3, 2)
        region = (
            ndimage.binary_dilation(ref, structure=struct, iterations=rule.dilation_iters)
            if ref.any()
            else ref
        )
        region_labels, n_ref = label_components(region, rule.connectivity)
        ref_labels = np.where(ref, region_labels, 0).astype(region_labels.dtype)
    else:
        ref_labels, n_ref = label_components(ref, rule.connectivity)
        region, region_labels = ref, ref_labels
    pred_labels, n_pred = label_components(pred, rule.connectivity)
    rc, pc = _components(ref_labels, n_ref), _components(pred_labels, n_pred)

    ref_small = rc.sizes * voxel_mm3 <= rule.min_ref_mm3
    pred_small = pc.sizes * voxel_mm3 <= rule.min_pred_mm3
    ir, ip, inn = _pairs(ref_labels, pred_labels, ref & pred, n_pred)
    if rule.dilation_iters:
        mr, mp, _ = _pairs(region_labels, pred_labels, region & pred, n_pred)
    else:
        mr, mp = ir, ip
    # removed lesions leave the tables (their voxels count as background)
    drop_ref = ref_small if rule.small_ref == "remove" else np.zeros(n_ref, dtype=bool)
    keep = ~(drop_ref[ir - 1] | pred_small[ip - 1])
    ir, ip, inn = ir[keep], ip[keep], inn[keep]
    keep = ~(drop_ref[mr - 1] | pred_small[mp - 1])
    mr, mp = mr[keep], mp[keep]

    ref_hit = np.zeros(n_ref, dtype=bool)
    pred_hit = np.zeros(n_pred, dtype=bool)  # matched to a counted reference lesion
    pred_touch = np.zeros(n_pred, dtype=bool)  # matched to any (counted or ignored) lesion
    match_iou = np.zeros(0)
    if rule.one_to_one:
        mr, mp, mn = _greedy(ir, ip, inn, rc, pc, rule)
        ref_hit[mr - 1] = True
        pred_touch[mp - 1] = True
        counted = ~ref_small[mr - 1]
        pred_hit[mp[counted] - 1] = True
        both_sizes = rc.sizes[mr - 1] + pc.sizes[mp - 1]
        ref_dice = np.zeros(n_ref)
        pred_dice = np.zeros(n_pred)
        ref_dice[mr - 1] = 2.0 * mn / both_sizes
        pred_dice[mp - 1] = 2.0 * mn / both_sizes
        match_iou = (mn / (both_sizes - mn))[counted]
    else:
        if rule.match == "anima":
            ref_hit = _anima_detected(ir, ip, inn, rc.sizes, pc.sizes, int((~drop_ref).sum()), rule)
            pred_hit = _anima_detected(
                ip, ir, inn, pc.sizes, rc.sizes, int((~pred_small).sum()), rule
            )
            pred_touch = pred_hit.copy()
        else:
            ref_hit[mr - 1] = True
            pred_touch[mp - 1] = True
            pred_hit[mp[~ref_small[mr - 1]] - 1] = True
        ref_dice = _union_dice(mr, mp, ir, inn, rc.sizes, pc.sizes)
        pred_dice = _union_dice(mp, mr, ip, inn, pc.sizes, rc.sizes)
        if rule.match == "anima":  # overlapping but not detected: scores 0, as a missed lesion
            ref_dice[~ref_hit] = 0.0
            pred_dice[~pred_hit] = 0.0

    ref_status = tuple(
        IGNORED if small else (TP if hit else FN)
        for small, hit in zip(ref_small.tolist(), ref_hit.tolist(), strict=True)
    )
    pred_status = tuple(
        IGNORED if small or (touch and not hit) else (TP if hit else FP)
        for small, hit, touch in zip(
            pred_small.tolist(), pred_hit.tolist(), pred_touch.tolist(), strict=True
        )
    )
    return Matching(
        ref=rc,
        pred=pc,
        ref_status=ref_status,
        pred_status=pred_status,
        ref_matched=_group(mr, mp, n_ref),
        pred_matched=_group(mp, mr, n_pred),
        ref_dice=ref_dice,
        pred_dice=pred_dice,
        match_iou=match_iou,
    )
