"""Tests for segmenter.evaluation.lesions: the rule table and :func:`match_lesions` on hand-built
masks.

One test per rule family (any overlap, one-to-one IoU / Dice, BraTS dilated matching, Anima
coverage, size limits), each on a few boxes whose statuses, matches and per-lesion Dice are
worked out by hand. The summaries built on top (recall, F1, PQ...) are tested in
``test_metrics.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mask_builders import boxes

from segmenter.config import PRESET_NAMES
from segmenter.evaluation.lesions import PRESETS, LesionRule, Matching, match_lesions, rule_to_dict

S = np.s_
ONE = (1.0, 1.0, 1.0)


def outcome(m: Matching) -> tuple:
    """Statuses and matches of both sides, as one comparable tuple."""
    return m.ref_status, m.pred_status, m.ref_matched, m.pred_matched


# ---------------------------------------------------------------- the rule table


def test_rule_table_has_one_rule_per_preset_name() -> None:
    assert tuple(PRESETS) == PRESET_NAMES


def test_presets_are_serialisable() -> None:
    for name, rule in PRESETS.items():
        assert json.loads(json.dumps(rule_to_dict(rule)))["match"] == rule.match, name
    assert PRESETS["isles22"] == LesionRule()
    assert PRESETS["atlas"].connectivity == 6 and PRESETS["msseg"].match == "anima"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"connectivity": 8}, r"connectivity=8: expected 6, 18 or 26"),
        ({"match": "centroid"}, r"match='centroid': expected overlap \| iou \| dice \| anima"),
        ({"small_ref": "keep"}, r"small_ref='keep': expected remove \| ignore"),
        ({"f1": "macro"}, r"f1='macro': expected counts \| harmonic"),
        ({"min_ref_mm3": -1.0}, r"min_ref_mm3=-1.0: expected a finite volume >= 0"),
        ({"min_pred_mm3": float("inf")}, r"min_pred_mm3=inf: expected a finite volume"),
        ({"threshold": 1.5}, r"threshold=1.5: expected a value in \[0, 1\]"),
        ({"dilation_iters": -1}, r"dilation_iters=-1: expected an integer >= 0"),
        ({"dilation_iters": 1.5}, r"dilation_iters=1.5: expected an integer >= 0"),
        ({"match": "iou", "dilation_iters": 2}, r"dilation_iters=2: expected 0 unless"),
        ({"alpha": 0.0}, r"alpha=0.0: expected a value in \(0, 1\] \(Anima\)"),
        ({"gamma": 1.2}, r"gamma=1.2: expected a value in \(0, 1\]"),
        ({"match": "anima", "small_ref": "ignore"}, r"small_ref='ignore': expected 'remove'"),
        ({"hd95_penalty_mm": -5.0}, r"hd95_penalty_mm=-5.0: expected None or a distance >= 0"),
    ],
)
def test_bad_rule_fields_raise(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=rf"LesionRule\.{message}"):
        LesionRule(**fields)


def test_one_to_one_rules() -> None:
    assert [LesionRule(match=m).one_to_one for m in ("overlap", "iou", "dice", "anima")] == [
        False,
        True,
        True,
        False,
    ]


# ---------------------------------------------------------------- components


def test_components_sizes_centroids_and_boxes_in_raster_order() -> None:
    ref = boxes((12, 12, 12), S[7:9, 7:9, 7:10], S[1:3, 1:3, 1:3])
    m = match_lesions(np.zeros_like(ref), ref, ONE, LesionRule())
    assert m.ref.n == 2 and m.pred.n == 0
    np.testing.assert_array_equal(m.ref.sizes, [8, 12])
    np.testing.assert_allclose(m.ref.centroids, [(1.5, 1.5, 1.5), (7.5, 7.5, 8.0)])
    np.testing.assert_array_equal(m.ref.bboxes, [[1, 1, 1, 3, 3, 3], [7, 7, 7, 9, 9, 10]])
    assert m.ref.labels[1, 1, 1] == 1 and m.ref.labels[8, 8, 9] == 2


def test_connectivity_decides_the_number_of_lesions() -> None:
    ref = np.zeros((6, 6, 6), dtype=bool)
    ref[1, 1, 1] = ref[2, 2, 2] = True  # corner neighbours
    empty = np.zeros_like(ref)
    assert [match_lesions(empty, ref, ONE, LesionRule(connectivity=c)).ref.n for c in (6, 26)] == [
        2,
        1,
    ]


def test_empty_masks_have_no_lesions() -> None:
    empty = np.zeros((0, 0, 0), dtype=bool)
    for name, rule in PRESETS.items():
        m = match_lesions(empty, empty, ONE, rule)
        assert (m.ref.n, m.pred.n) == (0, 0), name
        assert outcome(m) == ((), (), (), ())
        assert m.ref_dice.shape == m.pred_dice.shape == m.match_iou.shape == (0,)


# ---------------------------------------------------------------- any overlap (ISLES'22, ATLAS)


def test_overlap_detects_touching_lesions_and_flags_the_rest() -> None:
    shape = (12, 12, 12)
    ref = boxes(shape, S[1:3, 1:3, 1:3], S[7:9, 7:9, 7:9])  # 8 voxels each
    pred = boxes(shape, S[2:4, 1:3, 1:3], S[10, 1, 1])  # 4 voxels on the first lesion; a speck
    m = match_lesions(pred, ref, ONE, PRESETS["isles22"])
    assert outcome(m) == (("TP", "FN"), ("TP", "FP"), ((1,), ()), ((1,), ()))
    np.testing.assert_allclose(m.ref_dice, [2 * 4 / 16, 0.0])
    np.testing.assert_allclose(m.pred_dice, [2 * 4 / 16, 0.0])
    assert m.match_iou.shape == (0,)


def test_overlap_dice_is_with_the_union_of_the_touching_lesions() -> None:
    ref = boxes((16, 16, 16), S[2:4, 2:4, 2:12])  # 40 voxels
    pred = ref.copy()
    pred[:, :, 7] = False  # pieces of 20 (z 2..6) and 16 (z 8..11) voxels
    m = match_lesions(pred, ref, ONE, PRESETS["isles22"])
    assert outcome(m) == (("TP",), ("TP", "TP"), ((1, 2),), ((1,), (1,)))
    np.testing.assert_allclose(m.ref_dice, [2 * 36 / (40 + 36)])
    np.testing.assert_allclose(m.pred_dice, [2 * 20 / (20 + 40), 2 * 16 / (16 + 40)])


# ---------------------------------------------------------------- one-to-one (panoptica)


def test_iou_one_to_one_accepts_pairs_at_the_threshold() -> None:
    ref = boxes((16, 16, 16), S[2:4, 2:4, 2:12])  # 40 voxels
    pred = ref.copy()
    pred[:, :, 7] = False  # IoU 20/40 = 0.5 with the first piece, 16/40 with the second
    m = match_lesions(pred, ref, ONE, PRESETS["panoptica"])
    assert outcome(m) == (("TP",), ("TP", "FP"), ((1,),), ((1,), ()))
    np.testing.assert_allclose(m.ref_dice, [2 * 20 / 60])
    np.testing.assert_allclose(m.pred_dice, [2 * 20 / 60, 0.0])
    np.testing.assert_allclose(m.match_iou, [0.5])


def test_one_to_one_ties_go_to_the_lower_id() -> None:
    ref = boxes((6, 6, 8), S[0:2, 0:2, 0:2], S[0:2, 0:2, 4:6])  # 8 voxels each
    pred = boxes((6, 6, 8), S[0:2, 0:2, 1:5])  # 16 voxels, 4 on each: IoU 4/20 = 0.2 twice
    m = match_lesions(pred, ref, ONE, LesionRule(match="iou", threshold=0.2))
    assert outcome(m) == (("TP", "FN"), ("TP",), ((1,), ()), ((1,),))
    np.testing.assert_allclose(m.match_iou, [0.2])
    np.testing.assert_allclose(m.ref_dice, [2 * 4 / 24, 0.0])
    strict = match_lesions(pred, ref, ONE, LesionRule(match="iou", threshold=0.21))
    assert outcome(strict) == (("FN", "FN"), ("FP",), ((), ()), ((),))


def test_dice_one_to_one_takes_the_best_score_first() -> None:
    ref = boxes((16, 16, 16), S[0:4, 0:4, 0:4], S[0:4, 0:4, 5:7])  # 64 and 32 voxels
    pred = boxes((16, 16, 16), S[0:4, 0:4, 2:7])  # 80 voxels, 32 on each lesion
    m = match_lesions(pred, ref, ONE, LesionRule(match="dice", threshold=0.2))
    # Dice 64/144 with the first lesion, 64/112 with the second: the second wins
    assert outcome(m) == (("FN", "TP"), ("TP",), ((), (1,)), ((2,),))
    np.testing.assert_allclose(m.ref_dice, [0.0, 64 / 112])
    np.testing.assert_allclose(m.match_iou, [32 / 80])


def test_one_to_one_match_with_an_ignored_lesion_is_not_counted() -> None:
    ref = boxes((10, 10, 10), S[1:4, 1:4, 1:4], S[7, 7, 7:9])  # 27 voxels; 2 voxels, ignored
    pred = boxes((10, 10, 10), S[1:4, 1:4, 1:3], S[7, 7, 7:9])  # IoU 18/27; an exact copy
    rule = LesionRule(match="iou", threshold=0.5, min_ref_mm3=3.0, small_ref="ignore")
    m = match_lesions(pred, ref, ONE, rule)
    assert outcome(m) == (("TP", "ignored"), ("TP", "ignored"), ((1,), (2,)), ((1,), (2,)))
    np.testing.assert_allclose(m.match_iou, [18 / 27])  # the ignored pair is left out
    np.testing.assert_allclose(m.ref_dice, [36 / 45, 1.0])


# ---------------------------------------------------------------- dilated matching (BraTS 2023)


def test_dilation_merges_near_lesions_and_matches_near_predictions() -> None:
    shape = (20, 20, 20)
    a, b = S[4:6, 4:6, 4:6], S[4:6, 4:6, 9:11]  # 8 voxels each, 3 apart: dilations touch
    speck = S[15, 15, 15]  # 1 voxel <= 3 mm3: ignored
    ref = boxes(shape, a, b, speck)
    far = S[0:2, 18:20, 0:2]  # pred 1: 8 voxels, no lesion near
    on_a = S[4:6, 4:6, 3:5]  # pred 2: 8 voxels, 4 on A
    near_b = S[4:6, 4:6, 12:14]  # pred 3: 8 voxels, 1 voxel from B (within 2 steps)
    near_speck = S[15, 15, 17:19]  # pred 4: 2 voxels within the speck's dilation
    pred = boxes(shape, far, on_a, near_b, near_speck)
    rule = LesionRule(dilation_iters=2, min_ref_mm3=3.0, small_ref="ignore")
    m = match_lesions(pred, ref, ONE, rule)
    np.testing.assert_array_equal(m.ref.sizes, [16, 1])  # A and B are one lesion
    assert outcome(m) == (
        ("TP", "ignored"),
        ("FP", "TP", "TP", "ignored"),
        ((2, 3), (4,)),
        ((), (1,), (1,), (2,)),
    )
    # Dice counts real overlap only: 4 voxels of A against 16 + 8 + 8
    np.testing.assert_allclose(m.ref_dice, [2 * 4 / 32, 0.0])
    np.testing.assert_allclose(m.pred_dice, [0.0, 2 * 4 / 24, 0.0, 0.0])
    undilated = match_lesions(pred, ref, ONE, LesionRule(min_ref_mm3=3.0, small_ref="ignore"))
    assert outcome(undilated)[:2] == (("TP", "FN", "ignored"), ("FP", "TP", "FP", "FP"))


# ---------------------------------------------------------------- coverage (Anima, MSSEG 2016)


def test_anima_needs_coverage_and_little_leakage() -> None:
    ref = boxes((10, 10, 10), S[4:6, 4:6, 4:6])  # 8 voxels
    big = boxes((10, 10, 10), S[2:7, 2:6, 2:6])  # 80 voxels around it: 90 % outside
    m = match_lesions(big, ref, ONE, PRESETS["msseg"])
    # beta fails the reference; the prediction is covered 8/80 = alpha, not above it
    assert outcome(m) == (("FN",), ("FP",), ((1,),), ((1,),))  # overlapping, not detected
    np.testing.assert_array_equal([m.ref_dice[0], m.pred_dice[0]], [0.0, 0.0])
    exact = match_lesions(ref, ref, ONE, PRESETS["msseg"])
    assert outcome(exact) == (("TP",), ("TP",), ((1,),), ((1,),))
    np.testing.assert_array_equal([exact.ref_dice[0], exact.pred_dice[0]], [1.0, 1.0])


def test_anima_walk_stops_once_gamma_is_covered() -> None:
    shape = (24, 12, 24)
    ref = boxes(shape, S[0:10, 0:10, 5])  # 100 voxels, one slice thick
    clean = S[0:7, 0:10, 5]  # 70 voxels on the lesion, visited first: gamma 0.65 reached
    leaky = (S[8:10, 0:5, 5], S[8:10, 0:5, 6:15])  # 10 on the lesion, 90 outside
    m = match_lesions(boxes(shape, clean, *leaky), ref, ONE, PRESETS["msseg"])
    assert outcome(m) == (("TP",), ("TP", "FP"), ((1, 2),), ((1,), (1,)))
    np.testing.assert_allclose(m.ref_dice, [2 * 80 / (100 + 170)])
    np.testing.assert_allclose(m.pred_dice, [2 * 70 / 170, 0.0])


# ---------------------------------------------------------------- size limits


def test_small_lesions_removed_become_background() -> None:
    shape = (10, 10, 10)
    ref = boxes(shape, S[2, 2, 2], S[6:8, 6:8, 6])  # 2 mm3 (removed) and 8 mm3
    pred = boxes(shape, S[2, 2, 2:4], S[6, 6, 6])  # 4 mm3 on the removed one; 2 mm3 (removed)
    rule = LesionRule(min_ref_mm3=3.0, min_pred_mm3=3.0)
    m = match_lesions(pred, ref, (1.0, 1.0, 2.0), rule)
    assert outcome(m) == (("ignored", "FN"), ("FP", "ignored"), ((), ()), ((), ()))
    np.testing.assert_array_equal(m.ref_dice, [0.0, 0.0])


def test_small_reference_lesions_ignored_still_absorb_predictions() -> None:
    shape = (10, 10, 10)
    ref = boxes(shape, S[2, 2, 2], S[6:8, 6:8, 6])
    pred = boxes(shape, S[2, 2, 2:4], S[6, 6, 6])
    rule = LesionRule(min_ref_mm3=3.0, min_pred_mm3=3.0, small_ref="ignore")
    m = match_lesions(pred, ref, (1.0, 1.0, 2.0), rule)
    assert outcome(m) == (("ignored", "FN"), ("ignored", "ignored"), ((1,), ()), ((1,), ()))
    np.testing.assert_allclose(m.ref_dice, [2 * 1 / 3, 0.0])
    np.testing.assert_allclose(m.pred_dice, [2 * 1 / 3, 0.0])
