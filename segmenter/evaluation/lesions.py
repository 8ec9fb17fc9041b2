"""Lesion matching engine: connected components, one overlap table, the challenges' matching rules.

A lesion is a connected component of a binary mask. :func:`match_lesions` works in phases:

1. label both masks (:func:`segmenter.evaluation.components.label_components`; the reference
through its
   dilation for BraTS);
2. one table of the voxel overlaps between reference and predicted lesions, from one pass over
   the voxels where both are foreground, less the pairs of lesions removed by size;
3. the rule decides the matches on that table (hundreds of entries), never again on the volume,
   so a case with 400 lesions costs about as much as one with 4;
4. each lesion's status: ``TP``, ``FN`` or ``FP``, or ``ignored`` (size limits).

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

from segmenter.evaluation.components import component_sizes, label_components

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
    foreground = np.flatnonzero(flat)
    ids = flat[foreground].astype(np.intp)
    sizes = component_sizes(ids, n).astype(np.int64)
    coords = np.unravel_index(foreground, labels.shape)
    centroids = np.zeros((n, 3))
    bboxes = np.zeros((n, 6), dtype=np.int64)
    if n:
        by_id = np.argsort(ids, kind="stable")
        starts = np.searchsorted(ids[by_id], np.arange(1, n + 1))
        for axis, coord in enumerate(coords):
            centroids[:, axis] = np.bincount(ids, weights=coord, minlength=n + 1)[1:] / sizes
            sorted_coord = coord[by_id]
            bboxes[:, axis] = np.minimum.reduceat(sorted_coord, starts)
            bboxes[:, axis + 3] = np.maximum.reduceat(sorted_coord, starts) + 1
    return Components(labels, sizes, centroids, bboxes)


@dataclass(frozen=True)
class _Pairs:
    """Pairs of reference and predicted lesions (1-based ids, one entry per pair).

    Attributes:
        ref: (k,) int64 reference lesion ids.
        pred: (k,) int64 predicted lesion ids.
        voxels: (k,) int64 voxels the two lesions of each pair share (> 0, or for
            dilation pairs the voxels the prediction shares with the reference's dilation).
    """

    ref: np.ndarray
    pred: np.ndarray
    voxels: np.ndarray

    def without(self, ref_removed: np.ndarray, pred_removed: np.ndarray) -> _Pairs:
        """The pairs whose lesions are both still there (masks indexed by id - 1)."""
        keep = ~(ref_removed[self.ref - 1] | pred_removed[self.pred - 1])
        return _Pairs(self.ref[keep], self.pred[keep], self.voxels[keep])


@dataclass(frozen=True)
class _Decision:
    """What a matching rule decided; per-lesion arrays are indexed by id - 1.

    Attributes:
        matched: the pairs matched to each other (``Matching.ref_matched`` / ``pred_matched``).
        ref_hit: (n_ref,) bool, reference lesion detected.
        pred_hit: (n_pred,) bool, predicted lesion matched to a counted reference lesion.
        pred_touch: (n_pred,) bool, predicted lesion matched to any (counted or ignored) one.
        ref_dice: (n_ref,) float64 Dice of each reference lesion with its matches.
        pred_dice: (n_pred,) float64 Dice of each predicted lesion with its matches.
        match_iou: IoU of each one-to-one match between counted lesions (else empty).
    """

    matched: _Pairs
    ref_hit: np.ndarray
    pred_hit: np.ndarray
    pred_touch: np.ndarray
    ref_dice: np.ndarray
    pred_dice: np.ndarray
    match_iou: np.ndarray


def _overlap_pairs(
    ref_labels: np.ndarray, pred_labels: np.ndarray, both: np.ndarray, n_pred: int
) -> _Pairs:
    """Every (reference, predicted) pair of components sharing voxels where ``both`` is set."""
    shared = np.flatnonzero(both.reshape(-1))
    ref_ids = ref_labels.reshape(-1)[shared].astype(np.int64)
    pred_ids = pred_labels.reshape(-1)[shared]
    keys, voxels = np.unique(ref_ids * (n_pred + 1) + pred_ids, return_counts=True)
    return _Pairs(keys // (n_pred + 1), keys % (n_pred + 1), voxels.astype(np.int64))


def _reference_lesions(
    ref: np.ndarray, rule: LesionRule
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """Label the reference: ``(labels, n, region, region_labels)``.

    Without dilation the region is the reference itself. With BraTS dilation the region is
    the dilated reference, each lesion is a component of the region (lesions whose dilations
    touch merge), and ``labels`` carries the region's ids on the reference voxels only.
    """
    if not rule.dilation_iters:
        labels, n = label_components(ref, rule.connectivity)
        return labels, n, ref, labels
    struct = ndimage.generate_binary_structure(3, 2)
    region = (
        ndimage.binary_dilation(ref, structure=struct, iterations=rule.dilation_iters)
        if ref.any()
        else ref
    )
    region_labels, n = label_components(region, rule.connectivity)
    labels = np.where(ref, region_labels, 0).astype(region_labels.dtype)
    return labels, n, region, region_labels


def _group(ids: np.ndarray, partners: np.ndarray, n: int) -> tuple[tuple[int, ...], ...]:
    """For each id 1..n, the sorted partners paired with it."""
    order = np.lexsort((partners, ids))
    sorted_ids, sorted_partners = ids[order], partners[order].tolist()
    bounds = np.searchsorted(sorted_ids, np.arange(1, n + 2)).tolist()
    return tuple(tuple(sorted_partners[bounds[i] : bounds[i + 1]]) for i in range(n))


def _union_dice(
    lesion_ids: np.ndarray,
    partner_ids: np.ndarray,
    *,
    overlap_ids: np.ndarray,
    overlap_voxels: np.ndarray,
    sizes: np.ndarray,
    partner_sizes: np.ndarray,
) -> np.ndarray:
    """Dice of each lesion with the union of the lesions matched to it (disjoint components).

    ``lesion_ids``/``partner_ids`` list the matched pairs; ``overlap_*`` the shared voxels of
    the overlapping pairs, all of which are matched (an overlapping pair always matches under
    the overlap and Anima rules).
    """
    n = sizes.shape[0]
    shared = np.bincount(overlap_ids, weights=overlap_voxels, minlength=n + 1)[1:]
    union = np.bincount(lesion_ids, weights=partner_sizes[partner_ids - 1], minlength=n + 1)[1:]
    return 2.0 * shared / (sizes + union)


def _both_union_dice(
    matched: _Pairs, overlap: _Pairs, ref: Components, pred: Components
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_union_dice` of every reference lesion and of every predicted lesion."""
    ref_dice = _union_dice(
        matched.ref, matched.pred, overlap_ids=overlap.ref, overlap_voxels=overlap.voxels,
        sizes=ref.sizes, partner_sizes=pred.sizes,
    )  # fmt: skip
    pred_dice = _union_dice(
        matched.pred, matched.ref, overlap_ids=overlap.pred, overlap_voxels=overlap.voxels,
        sizes=pred.sizes, partner_sizes=ref.sizes,
    )  # fmt: skip
    return ref_dice, pred_dice


def _match_any_overlap(
    touch: _Pairs, overlap: _Pairs, lesions: tuple[Components, Components], ref_small: np.ndarray
) -> _Decision:
    """ISLES'22 / BraTS: every touching pair matches (``touch`` = pairs through the dilation).
    ``lesions``: the reference and predicted components."""
    ref, pred = lesions
    ref_hit = np.zeros(ref.n, dtype=bool)
    pred_hit = np.zeros(pred.n, dtype=bool)
    pred_touch = np.zeros(pred.n, dtype=bool)
    ref_hit[touch.ref - 1] = True
    pred_touch[touch.pred - 1] = True
    pred_hit[touch.pred[~ref_small[touch.ref - 1]] - 1] = True
    ref_dice, pred_dice = _both_union_dice(touch, overlap, ref, pred)
    return _Decision(
        matched=touch,
        ref_hit=ref_hit,
        pred_hit=pred_hit,
        pred_touch=pred_touch,
        ref_dice=ref_dice,
        pred_dice=pred_dice,
        match_iou=np.zeros(0),
    )


def _anima_detected(
    tested_ids: np.ndarray,
    other_ids: np.ndarray,
    *,
    overlap_voxels: np.ndarray,
    tested_sizes: np.ndarray,
    other_sizes: np.ndarray,
    n_tested_kept: int,
    rule: LesionRule,
) -> np.ndarray:
    """Anima's detection test for every lesion of one side (``getTruePositiveLesions``).

    Args:
        tested_ids, other_ids, overlap_voxels: overlap table between kept lesions (1-based ids,
            voxels > 0), the side under test first.
        tested_sizes, other_sizes: voxel counts of every lesion (index id - 1).
        n_tested_kept: number of kept lesions on the tested side (bounds the walk, as Anima).
        rule: supplies alpha, beta, gamma.

    Returns:
        (n_tested,) bool, True where the lesion is detected.
    """
    n_tested = tested_sizes.shape[0]
    covered = np.bincount(tested_ids, weights=overlap_voxels, minlength=n_tested + 1)[1:]
    other_covered = np.bincount(
        other_ids, weights=overlap_voxels, minlength=other_sizes.shape[0] + 1
    )[1:]
    other_outside = (other_sizes - other_covered) / other_sizes
    detected = np.zeros(n_tested, dtype=bool)
    # per tested lesion, its partners by decreasing overlap (ties: increasing id)
    order = np.lexsort((other_ids, -overlap_voxels, tested_ids))
    partners, overlaps = other_ids[order].tolist(), overlap_voxels[order].tolist()
    bounds = np.searchsorted(tested_ids[order], np.arange(1, n_tested + 2)).tolist()
    for lesion in range(1, n_tested + 1):
        first, end = bounds[lesion - 1], bounds[lesion]
        total = covered[lesion - 1]  # voxels of the lesion covered by the other side
        if first == end or not total / tested_sizes[lesion - 1] > rule.alpha:
            continue
        share, visited, failed = 0.0, 0, False
        while share < rule.gamma and visited < n_tested_kept + 1 and first + visited < end:
            failed = other_outside[partners[first + visited] - 1] > rule.beta
            if failed:
                break
            share += overlaps[first + visited] / total
            visited += 1
        detected[lesion - 1] = not failed
    return detected


def _match_anima(
    overlap: _Pairs, lesions: tuple[Components, Components], kept: tuple[int, int], rule: LesionRule
) -> _Decision:
    """MSSEG 2016 (Anima): coverage tests both ways; overlapping pairs are the matches.
    ``lesions``: the reference and predicted components; ``kept``: how many of each count."""
    (ref, pred), (ref_kept, pred_kept) = lesions, kept
    ref_hit = _anima_detected(
        overlap.ref, overlap.pred, overlap_voxels=overlap.voxels, tested_sizes=ref.sizes,
        other_sizes=pred.sizes, n_tested_kept=ref_kept, rule=rule,
    )  # fmt: skip
    pred_hit = _anima_detected(
        overlap.pred, overlap.ref, overlap_voxels=overlap.voxels, tested_sizes=pred.sizes,
        other_sizes=ref.sizes, n_tested_kept=pred_kept, rule=rule,
    )  # fmt: skip
    ref_dice, pred_dice = _both_union_dice(overlap, overlap, ref, pred)
    ref_dice[~ref_hit] = 0.0  # overlapping but not detected: scores 0, as a missed lesion
    pred_dice[~pred_hit] = 0.0
    return _Decision(
        matched=overlap,
        ref_hit=ref_hit,
        pred_hit=pred_hit,
        pred_touch=pred_hit.copy(),
        ref_dice=ref_dice,
        pred_dice=pred_dice,
        match_iou=np.zeros(0),
    )


def _greedy(overlap: _Pairs, ref: Components, pred: Components, rule: LesionRule) -> _Pairs:
    """One-to-one best-first matching: the accepted pairs, best score first."""
    ref_size = ref.sizes[overlap.ref - 1].astype(np.float64)
    pred_size = pred.sizes[overlap.pred - 1].astype(np.float64)
    shared = overlap.voxels.astype(np.float64)
    if rule.match == "iou":
        score = shared / (ref_size + pred_size - shared)
    else:
        score = 2.0 * shared / (ref_size + pred_size)
    ref_taken = np.zeros(ref.n + 1, dtype=bool)
    pred_taken = np.zeros(pred.n + 1, dtype=bool)
    accepted = []
    for i in np.lexsort((overlap.ref, overlap.pred, -score)).tolist():
        if score[i] < rule.threshold:
            break
        ref_id, pred_id = overlap.ref[i], overlap.pred[i]
        if ref_taken[ref_id] or pred_taken[pred_id]:
            continue
        ref_taken[ref_id] = pred_taken[pred_id] = True
        accepted.append(i)
    sel = np.asarray(accepted, dtype=np.intp)
    return _Pairs(overlap.ref[sel], overlap.pred[sel], overlap.voxels[sel])


def _match_one_to_one(
    overlap: _Pairs, lesions: tuple[Components, Components], ref_small: np.ndarray, rule: LesionRule
) -> _Decision:
    """Panoptica: greedy IoU / Dice pairs; each lesion scores the Dice of its one match.
    ``lesions``: the reference and predicted components."""
    ref, pred = lesions
    matched = _greedy(overlap, ref, pred, rule)
    ref_hit = np.zeros(ref.n, dtype=bool)
    pred_hit = np.zeros(pred.n, dtype=bool)
    pred_touch = np.zeros(pred.n, dtype=bool)
    ref_hit[matched.ref - 1] = True
    pred_touch[matched.pred - 1] = True
    counted = ~ref_small[matched.ref - 1]
    pred_hit[matched.pred[counted] - 1] = True
    both_sizes = ref.sizes[matched.ref - 1] + pred.sizes[matched.pred - 1]
    ref_dice = np.zeros(ref.n)
    pred_dice = np.zeros(pred.n)
    ref_dice[matched.ref - 1] = 2.0 * matched.voxels / both_sizes
    pred_dice[matched.pred - 1] = 2.0 * matched.voxels / both_sizes
    match_iou = (matched.voxels / (both_sizes - matched.voxels))[counted]
    return _Decision(
        matched=matched,
        ref_hit=ref_hit,
        pred_hit=pred_hit,
        pred_touch=pred_touch,
        ref_dice=ref_dice,
        pred_dice=pred_dice,
        match_iou=match_iou,
    )


def _statuses(
    ref_small: np.ndarray, pred_small: np.ndarray, decision: _Decision
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``TP``/``FN``/``ignored`` per reference lesion, ``TP``/``FP``/``ignored`` per prediction."""
    ref_status = tuple(
        IGNORED if small else (TP if hit else FN)
        for small, hit in zip(ref_small.tolist(), decision.ref_hit.tolist(), strict=True)
    )
    pred_status = tuple(
        IGNORED if small or (touch and not hit) else (TP if hit else FP)
        for small, hit, touch in zip(
            pred_small.tolist(),
            decision.pred_hit.tolist(),
            decision.pred_touch.tolist(),
            strict=True,
        )
    )
    return ref_status, pred_status


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
    ref_labels, n_ref, region, region_labels = _reference_lesions(ref, rule)
    pred_labels, n_pred = label_components(pred, rule.connectivity)
    ref_lesions, pred_lesions = _components(ref_labels, n_ref), _components(pred_labels, n_pred)
    ref_small = ref_lesions.sizes * voxel_mm3 <= rule.min_ref_mm3
    pred_small = pred_lesions.sizes * voxel_mm3 <= rule.min_pred_mm3
    # removed lesions leave the tables (their voxels count as background)
    ref_removed = ref_small if rule.small_ref == "remove" else np.zeros(n_ref, dtype=bool)
    overlap = _overlap_pairs(ref_labels, pred_labels, ref & pred, n_pred)
    overlap = overlap.without(ref_removed, pred_small)
    touch = overlap
    if rule.dilation_iters:
        touch = _overlap_pairs(region_labels, pred_labels, region & pred, n_pred)
        touch = touch.without(ref_removed, pred_small)

    lesions = (ref_lesions, pred_lesions)
    if rule.one_to_one:
        decision = _match_one_to_one(overlap, lesions, ref_small, rule)
    elif rule.match == "anima":
        kept = (int((~ref_removed).sum()), int((~pred_small).sum()))
        decision = _match_anima(overlap, lesions, kept, rule)
    else:
        decision = _match_any_overlap(touch, overlap, lesions, ref_small)
    ref_status, pred_status = _statuses(ref_small, pred_small, decision)
    return Matching(
        ref=ref_lesions,
        pred=pred_lesions,
        ref_status=ref_status,
        pred_status=pred_status,
        ref_matched=_group(decision.matched.ref, decision.matched.pred, n_ref),
        pred_matched=_group(decision.matched.pred, decision.matched.ref, n_pred),
        ref_dice=decision.ref_dice,
        pred_dice=decision.pred_dice,
        match_iou=decision.match_iou,
    )
