"""Tests for segmenter.evaluation.metrics: voxel metrics, HD95 and the lesion-wise summaries.

Hand-built masks whose answer is known and where the presets' summaries disagree, oracles (MONAI
HD95, naive re-implementations of the ISLES'22 and Anima rules, panoptica on real MS lesion
masks). The rule table and the matching engine alone: ``test_lesions.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mask_builders import boxes, voxels
from scipy import ndimage

from segmenter.data.synthetic import perturb_mask
from segmenter.evaluation import metrics
from segmenter.evaluation.lesions import PRESETS, LesionRule
from segmenter.io import read_image

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MASKS = DATA / "MSLesjak_masks_only"
ONE = (1.0, 1.0, 1.0)


def summary(pred: np.ndarray, ref: np.ndarray, rule: str | LesionRule = "isles22", **kw):
    return metrics.lesion_metrics(pred, ref, kw.pop("spacing", ONE), rule, **kw).summary


def counts(s: dict) -> tuple[int, ...]:
    return (s["n_ref"], s["n_pred"], s["tp"], s["fp"], s["fn"], s["tp_pred"])


def blobs(rng: np.random.Generator, shape: tuple[int, int, int], level: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 1.0) > level


S = np.s_
SHAPE = (16, 16, 16)


# ---------------------------------------------------------------- voxel metrics


def test_voxel_metrics_golden_counts_and_volume():
    ref = boxes(SHAPE, S[2:4, 2:4, 2:4])  # 8 voxels
    pred = boxes(SHAPE, S[2:4, 2:4, 3:6])  # 12 voxels, 4 shared
    m = metrics.voxel_metrics(pred, ref, (0.5, 1.0, 2.0))  # 1 mm3 voxels
    assert (m["TP"], m["FP"], m["FN"], m["n_pred"], m["n_ref"]) == (4, 8, 4, 12, 8)
    assert m["TN"] == 16**3 - 16
    assert m["Dice"] == pytest.approx(8 / 20)
    assert m["IoU"] == pytest.approx(4 / 16)
    assert m["precision"] == pytest.approx(4 / 12)
    assert m["recall"] == pytest.approx(4 / 8)
    assert m["volume_diff_ml"] == pytest.approx(0.004)


def test_voxel_metrics_empty_policy():
    empty = np.zeros(SHAPE, dtype=bool)
    m = metrics.voxel_metrics(empty, empty, ONE)
    for key in ("Dice", "IoU", "precision", "recall", "HD95"):
        assert math.isnan(m[key]), key
    assert m["volume_diff_ml"] == 0 and m["TN"] == 16**3
    fp_only = metrics.voxel_metrics(voxels(SHAPE, (3, 3, 3)), empty, ONE)
    assert fp_only["Dice"] == 0 and fp_only["precision"] == 0
    assert math.isnan(fp_only["recall"]) and math.isnan(fp_only["HD95"])


def test_hd95_anisotropic_golden():
    # ref: 4 voxels along x at z=2; pred: 6 voxels along x at z=3; spacing x 0.5, z 2.0 mm
    ref = boxes(SHAPE, S[2:6, 2, 2])
    pred = boxes(SHAPE, S[2:8, 2, 3])
    sp = (0.5, 1.5, 2.0)
    # pred -> ref: 2, 2, 2, 2, sqrt(0.5^2 + 4), sqrt(1 + 4); ref -> pred: all 2
    d5, d6 = math.sqrt(4.25), math.sqrt(5.0)
    assert metrics.hd95(pred, ref, sp) == pytest.approx(d5 + 0.75 * (d6 - d5))
    assert metrics.hd95(pred, ref, sp, percentile=100) == pytest.approx(d6)
    m = metrics.voxel_metrics(pred, ref, sp)
    assert m["HD95"] == pytest.approx(d5 + 0.75 * (d6 - d5))
    assert m["volume_pred_ml"] == pytest.approx(6 * 1.5 / 1000)
    assert m["volume_diff_ml"] == pytest.approx(2 * 1.5 / 1000)
    vols = {(r.source, r.id): r.volume_mm3 for r in metrics.lesion_metrics(pred, ref, sp).lesions}
    assert vols == {("ref", 1): pytest.approx(6.0), ("pred", 1): pytest.approx(9.0)}


def test_hd95_surface_only_and_border():
    # a filled cube against itself shifted: interior voxels never count, the border is outside
    ref = boxes(SHAPE, S[0:6, 0:6, 0:6])
    pred = boxes(SHAPE, S[0:6, 0:6, 1:7])
    assert metrics.hd95(pred, ref, ONE, percentile=100) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_matches_monai():
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(3)
    for sp in [(1.0, 1.0, 1.0), (0.5, 1.5, 2.0), (1.2, 0.7, 3.0)]:
        a, b = blobs(rng, (24, 22, 20), 0.53), blobs(rng, (24, 22, 20), 0.53)
        expected = monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(a[None, None].astype(np.float32)),
            torch.from_numpy(b[None, None].astype(np.float32)),
            include_background=True,
            percentile=95,
            spacing=sp,
        )
        assert metrics.hd95(a, b, sp) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------- lesion rules, hand-built


def test_split_lesion_rules_disagree():
    ref = boxes(SHAPE, S[2:4, 2:4, 2:12])  # 40 voxels
    pred = ref.copy()
    pred[:, :, 7] = False  # two pieces: 20 voxels (z 2..6) and 16 voxels (z 8..11)
    s = summary(pred, ref)
    assert counts(s) == (1, 2, 1, 0, 0, 2)
    assert (s["recall"], s["precision"], s["f1"]) == (1.0, 1.0, 1.0)
    assert s["lesion_dice"] == pytest.approx(2 * 36 / (40 + 36))
    # panoptica: IoU 20/40 = 0.5 passes (>=), 16/40 does not
    p = summary(pred, ref, "panoptica")
    assert counts(p) == (1, 2, 1, 1, 0, 1)
    assert p["RQ"] == pytest.approx(1 / 1.5)
    assert p["SQ"] == pytest.approx(0.5)
    assert p["PQ"] == pytest.approx(0.5 / 1.5)
    assert p["lesion_dice"] == pytest.approx(2 * 20 / 60)
    m = summary(pred, ref, "msseg")
    assert counts(m) == (1, 2, 1, 0, 0, 2) and m["f1"] == 1.0


def test_bridging_prediction():
    ref = boxes(SHAPE, S[2:4, 2:4, 2:6], S[2:4, 2:4, 8:12])  # two 16-voxel lesions
    pred = boxes(SHAPE, S[2:4, 2:4, 2:12])  # one 40-voxel bridge
    res = metrics.lesion_metrics(pred, ref, ONE)
    s = res.summary
    assert counts(s) == (2, 1, 2, 0, 0, 1)
    assert s["f1"] == 1.0 and s["count_diff"] == 1 and s["count_diff_signed"] == -1
    assert s["lesion_dice"] == pytest.approx(32 / 56)
    pred_rec = [r for r in res.lesions if r.source == "pred"]
    assert len(pred_rec) == 1 and pred_rec[0].matched == (1, 2) and pred_rec[0].status == "TP"
    assert pred_rec[0].dice == pytest.approx(2 * 32 / (40 + 32))
    p = summary(pred, ref, "panoptica")  # IoU 16/40 with each: no match
    assert counts(p) == (2, 1, 0, 1, 2, 0)
    assert (p["RQ"], p["SQ"], p["PQ"]) == (0.0, 0.0, 0.0)
    assert counts(summary(pred, ref, "msseg")) == (2, 1, 2, 0, 0, 1)


def test_one_voxel_false_positive():
    ref = boxes(SHAPE, S[2:5, 2:5, 2:5])
    pred = ref | voxels(SHAPE, (12, 12, 12))
    s = summary(pred, ref)
    assert counts(s) == (1, 2, 1, 1, 0, 1)
    assert s["precision"] == 0.5 and s["fp_per_case"] == 1
    assert s["f1"] == pytest.approx(1 / 1.5)
    # msseg removes lesions <= 3 mm3 from both masks
    m = summary(pred, ref, "msseg")
    assert counts(m) == (1, 1, 1, 0, 0, 1) and m["precision"] == 1.0
    # brats23: the FP counts Dice 0 / HD95 374 in the lesion-wise averages
    b = summary(pred, ref, "brats23", spacing=(2.0, 2.0, 2.0))  # 27 voxels = 216 mm3 > 50
    assert b["fp"] == 1
    assert b["lesionwise_dice"] == pytest.approx(1.0 / 2)
    assert b["lesionwise_hd95"] == pytest.approx((0.0 + 374.0) / 2)


def test_empty_reference_and_prediction():
    empty = np.zeros(SHAPE, dtype=bool)
    for name in PRESETS:
        res = metrics.lesion_metrics(empty, empty, ONE, name)
        s = res.summary
        assert res.lesions == []
        assert counts(s) == (0, 0, 0, 0, 0, 0)
        for key in ("recall", "precision", "f1", "lesion_dice"):
            assert math.isnan(s[key]), (name, key)
        assert all(b["n"] == 0 and math.isnan(b["recall"]) for b in s["recall_by_size"].values())
    b = summary(empty, empty, "brats23")
    assert (b["lesionwise_dice"], b["lesionwise_hd95"]) == (1.0, 0.0)
    p = summary(empty, empty, "panoptica")
    assert all(math.isnan(p[k]) for k in ("RQ", "SQ", "PQ"))


def test_empty_reference_with_false_positives():
    empty = np.zeros(SHAPE, dtype=bool)
    pred = boxes(SHAPE, S[1:3, 1:3, 1:3], S[8:11, 8:11, 8:11])
    for name in PRESETS:
        s = summary(pred, empty, name)
        assert counts(s) == (0, 2, 0, 2, 0, 0), name
        assert math.isnan(s["recall"]) and math.isnan(s["lesion_dice"])
        assert s["precision"] == 0.0 and s["f1"] == 0.0 and s["fp_per_case"] == 2
    assert summary(pred, empty, "panoptica")["PQ"] == 0.0
    assert summary(pred, empty, "brats23")["lesionwise_hd95"] == 374.0
    missed = summary(empty, pred)  # the mirror case: recall 0, precision NaN
    assert missed["recall"] == 0.0 and math.isnan(missed["precision"]) and missed["f1"] == 0.0


def test_min_size_in_mm3_remove_versus_ignore():
    ref = boxes(SHAPE, S[2:5, 2:5, 2:5], S[10:12, 10, 10])  # 27 voxels and 2 voxels
    pred = boxes(SHAPE, S[10:13, 10, 10])  # touches only the small lesion
    remove = LesionRule(min_ref_mm3=3.0)
    s = summary(pred, ref, remove)  # 2 mm3 <= 3: removed, the prediction becomes a FP
    assert counts(s) == (1, 1, 0, 1, 1, 0)
    assert counts(summary(pred, ref, remove, spacing=(2.0, 1.0, 1.0))) == (2, 1, 1, 0, 1, 1)
    ignore = LesionRule(min_ref_mm3=3.0, small_ref="ignore")
    res = metrics.lesion_metrics(pred, ref, ONE, ignore)
    assert counts(res.summary) == (1, 0, 0, 0, 1, 0)  # neither counted nor false
    status = {(r.source, r.id): r.status for r in res.lesions}
    assert status == {("ref", 1): "FN", ("ref", 2): "ignored", ("pred", 1): "ignored"}
    assert counts(summary(pred, ref, LesionRule(min_pred_mm3=3.0))) == (2, 0, 0, 0, 2, 0)


def test_connectivity_on_diagonal_voxels():
    corner = voxels(SHAPE, (5, 5, 5), (6, 6, 6))
    edge = voxels(SHAPE, (5, 5, 5), (6, 6, 5))
    empty = np.zeros(SHAPE, dtype=bool)
    for mask, n6, n18, n26 in ((corner, 2, 2, 1), (edge, 2, 1, 1)):
        assert summary(empty, mask, "atlas")["n_ref"] == n6
        assert summary(empty, mask, LesionRule(connectivity=18))["n_ref"] == n18
        assert summary(empty, mask, "isles22")["n_ref"] == n26
    # a prediction covering one of the two corner voxels detects 1 lesion (26) or 1 of 2 (6)
    pred = voxels(SHAPE, (5, 5, 5))
    assert summary(pred, corner)["recall"] == 1.0
    assert summary(pred, corner, "atlas")["recall"] == 0.5


def test_size_bins():
    ref = boxes(
        SHAPE,
        S[0, 0, 0],
        S[3:5, 3:5, 0:2],
        S[8:10, 0:5, 0:1],
        S[0:5, 8:13, 8:12],
        S[12:16, 12:16, 12:16],
    )  # volumes 1, 8, 10, 100, 64
    pred = boxes(SHAPE, S[0, 0, 0], S[8, 0, 0], S[12, 12, 12])
    s = summary(pred, ref)
    assert s["recall_by_size"] == {
        "0-10": {"n": 2, "detected": 1, "recall": 0.5},
        "10-100": {"n": 2, "detected": 2, "recall": 1.0},
        "100-1000": {"n": 1, "detected": 0, "recall": 0.0},
        "1000-inf": {"n": 0, "detected": 0, "recall": pytest.approx(math.nan, nan_ok=True)},
    }
    # spacing scales volumes: at 2 mm isotropic (8 mm3 voxels) the 1-voxel lesion is 8 mm3
    custom = summary(pred, ref, size_bins_mm3=(5, 50, 500), spacing=(2.0, 2.0, 2.0))
    assert {k: v["n"] for k, v in custom["recall_by_size"].items()} == {"5-50": 1, "50-500": 2}
    assert metrics.size_bin_labels((0, 2.5, math.inf)) == ["0-2.5", "2.5-inf"]
    with pytest.raises(ValueError, match="increasing edges"):
        summary(pred, ref, size_bins_mm3=(10, 5))


def test_brats23_dilation_merges_and_small_lesions_absorb():
    shape = (40, 40, 40)
    a, b = S[5:9, 5:9, 5:9], S[5:9, 5:9, 12:16]  # 64 voxels each, 3 voxels apart: merged
    c = S[25:28, 25:28, 25:28]  # 27 voxels <= 50 mm3: ignored
    ref = boxes(shape, a, b, c)
    d = S[27:30, 25:28, 25:28]  # touches only the ignored lesion
    e = a  # exact copy of A
    f = S[5:9, 5:9, 17:19]  # 1 voxel away from B: matches through the dilation
    g = S[30:33, 5:8, 30:33]  # far: false positive
    pred = boxes(shape, d, e, f, g)
    res = metrics.lesion_metrics(pred, ref, ONE, "brats23")
    s = res.summary
    assert counts(s) == (1, 3, 1, 1, 0, 2)
    dice = 2 * 64 / (128 + 64 + 32)
    assert s["lesion_dice"] == pytest.approx(dice)
    assert s["lesionwise_dice"] == pytest.approx(dice / 2)
    hd = metrics.hd95(boxes(shape, e, f), boxes(shape, a, b), ONE)
    assert s["lesion_hd95"] == pytest.approx(hd)
    assert s["lesionwise_hd95"] == pytest.approx((hd + 374) / 2)
    refs = [r for r in res.lesions if r.source == "ref"]
    assert [(r.volume_mm3, r.status) for r in refs] == [(128.0, "TP"), (27.0, "ignored")]
    # the same masks under isles22: A, B and C are 3 lesions; F and G are false
    assert counts(summary(pred, ref)) == (3, 4, 2, 2, 1, 2)


def test_anima_beta_and_alpha_thresholds():
    ref = boxes(SHAPE, S[4:6, 4:6, 4:6])  # 8 voxels
    big = boxes(SHAPE, S[2:7, 2:6, 2:6])  # 80 voxels containing the lesion: 90 % outside
    assert counts(summary(big, ref)) == (1, 1, 1, 0, 0, 1)
    m = summary(big, ref, "msseg")  # beta 0.7 fails R; P covered 8/80 = alpha, not above it
    assert counts(m) == (1, 1, 0, 1, 1, 0)
    assert (m["recall"], m["precision"], m["f1"], m["lesion_dice"]) == (0.0, 0.0, 0.0, 0.0)
    assert summary(big, ref)["lesion_dice"] == pytest.approx(2 * 8 / 88)
    slab = boxes(SHAPE, S[0:10, 0:2, 5])  # 20 voxels
    rule = LesionRule(connectivity=6, match="anima", f1="harmonic")
    assert summary(boxes(SHAPE, S[0:2, 0, 5]), slab, rule)["tp"] == 0  # 2/20 = alpha
    assert summary(boxes(SHAPE, S[0:3, 0, 5]), slab, rule)["tp"] == 1


def test_anima_gamma_walk():
    shape = (24, 12, 24)
    ref = boxes(shape, S[0:10, 0:10, 5])  # 100 voxels, one slice thick
    inside = S[0:7, 0:10, 5]  # 70 voxels of the lesion
    leaky = (S[8:10, 0:5, 5], S[8:10, 0:5, 6:15])  # 10 in the lesion, 90 outside
    s = summary(boxes(shape, inside, *leaky), ref, "msseg")
    assert counts(s) == (1, 2, 1, 1, 0, 1)  # gamma reached by the clean one first
    inside = S[0:3, 0:10, 5]  # 30 voxels
    leaky = (S[4:10, 0:10, 5], S[4:10, 0:10, 6:15])  # 60 in, 540 out: visited first, fails
    assert counts(summary(boxes(shape, inside, *leaky), ref, "msseg")) == (1, 2, 0, 1, 1, 1)


def test_anima_walk_bound_is_faithful():
    # Anima visits at most (number of reference lesions + 1) predictions: with one reference
    # lesion the leaky third piece is never visited; a second lesion makes it visited.
    shape = (24, 12, 24)
    ref = boxes(shape, S[0:20, 0:10, 10])  # 200 voxels
    pieces = (S[0:6, 0:10, 10], S[7:12, 0:10, 10], S[13:18, 0:10, 10:20], S[19:20, 0:10, 10])
    pred = boxes(shape, *pieces)  # overlaps 60, 50, 50 (leaky, 90 % outside), 10
    assert counts(summary(pred, ref, "msseg"))[:3] == (1, 4, 1)
    other = boxes(shape, S[20:23, 0:3, 0:3])  # a second, detected lesion
    assert counts(summary(pred | other, ref | other, "msseg"))[:3] == (2, 5, 1)


def test_greedy_one_to_one_dice():
    ref = boxes(SHAPE, S[0:4, 0:4, 0:4], S[0:4, 0:4, 5:7])  # 64 and 32 voxels
    pred = boxes(SHAPE, S[0:4, 0:4, 2:7])  # 80 voxels: 32 with the first, 32 with the second
    res = metrics.lesion_metrics(pred, ref, ONE, LesionRule(match="dice", threshold=0.2))
    # Dice 64/144 = 0.444 with the first lesion, 64/112 = 0.571 with the second: second wins
    assert counts(res.summary) == (2, 1, 1, 0, 1, 1)
    matched = {(r.source, r.id): r.matched for r in res.lesions}
    assert matched == {("ref", 1): (), ("ref", 2): (1,), ("pred", 1): (2,)}
    assert res.summary["SQ"] == pytest.approx(32 / 80)


def test_records_ids_centroids_and_status():
    ref = boxes(SHAPE, S[10:12, 4:6, 1:3], S[2:4, 2:4, 2:4])
    pred = boxes(SHAPE, S[2:4, 2:4, 3:5], S[14, 14, 14])
    res = metrics.lesion_metrics(pred, ref, ONE)
    rows = {(r.source, r.id): r for r in res.lesions}
    assert rows["ref", 1].centroid_vox == pytest.approx((2.5, 2.5, 2.5))  # C raster order
    assert rows["ref", 2].centroid_vox == pytest.approx((10.5, 4.5, 1.5))
    assert (rows["ref", 1].status, rows["ref", 2].status) == ("TP", "FN")
    assert (rows["pred", 1].status, rows["pred", 2].status) == ("TP", "FP")
    assert rows["ref", 1].matched == (1,) and rows["pred", 2].matched == ()
    assert rows["ref", 1].dice == pytest.approx(0.5) and rows["ref", 2].dice == 0.0
    assert rows["pred", 2].dice == 0.0 and rows["pred", 2].volume_mm3 == 1.0
    assert math.isnan(rows["ref", 1].hd95)


def test_input_dtypes_and_layouts_agree():
    rng = np.random.default_rng(0)
    ref, pred = blobs(rng, (20, 18, 16), 0.55), blobs(rng, (20, 18, 16), 0.55)
    expected = summary(pred, ref)
    variants = [
        (pred.astype(np.uint8), ref.astype(np.int64)),
        (pred.astype(np.float32), ref.astype(np.float64)),
        (np.asfortranarray(pred), np.asfortranarray(ref)),
        (np.asfortranarray(pred), np.pad(ref, 1)[1:-1, 1:-1, 1:-1]),
    ]
    for p, r in variants:
        assert counts(summary(p, r)) == counts(expected)
        assert summary(p, r)["lesion_dice"] == expected["lesion_dice"]
        assert metrics.voxel_metrics(p, r, ONE)["HD95"] == pytest.approx(
            metrics.voxel_metrics(pred, ref, ONE)["HD95"]
        )


def test_bad_inputs_raise():
    ok = np.zeros(SHAPE, dtype=np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.lesion_metrics(ok, np.zeros((4, 4, 4), bool), ONE)
    with pytest.raises(ValueError, match="3D"):
        metrics.voxel_metrics(np.zeros((4, 4), bool), np.zeros((4, 4), bool), ONE)
    two = ok.copy()
    two[1, 1, 1] = 2
    with pytest.raises(ValueError, match="ref must be a binary mask.*value 2"):
        metrics.lesion_metrics(ok, two, ONE)
    with pytest.raises(ValueError, match="binary mask"):
        metrics.voxel_metrics(np.full(SHAPE, 0.5), ok, ONE)
    with pytest.raises(ValueError, match="spacing"):
        metrics.voxel_metrics(ok, ok, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="unknown lesion preset 'isles'; valid: isles22, atlas"):
        metrics.lesion_metrics(ok, ok, ONE, "isles")
    with pytest.raises(TypeError, match="rule must be a LesionRule or a preset name, got int"):
        metrics.lesion_metrics(ok, ok, ONE, 3)  # type: ignore[arg-type]


def test_empty_policy_is_serialisable():
    assert json.loads(json.dumps(metrics.EMPTY_POLICY)) == metrics.EMPTY_POLICY


def test_metrics_module_imports_no_torch():
    code = "import sys, segmenter.evaluation.metrics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# ---------------------------------------------------------------- oracles on random masks


def naive_isles(pred: np.ndarray, ref: np.ndarray, connectivity: int) -> tuple:
    """ISLES'22 compute_lesion_f1_score's loops, plus per-lesion union Dice."""
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    rl, nr = ndimage.label(ref, structure)
    pl, npred = ndimage.label(pred, structure)
    tp = fp = 0
    dices = []
    for i in range(1, nr + 1):
        lesion = rl == i
        touching = np.unique(pl[lesion & pred])
        tp += touching.size > 0
        union = np.isin(pl, touching[touching > 0])
        dices.append(2 * (union & lesion).sum() / (lesion.sum() + union.sum()))
    for j in range(1, npred + 1):
        fp += not ref[pl == j].any()
    return nr, npred, tp, fp, float(np.mean(dices)) if dices else math.nan


def naive_anima(pred, ref, voxel_mm3, alpha=0.1, beta=0.7, gamma=0.65, min_mm3=3.0) -> tuple:
    """animaSegPerfAnalyzer's overlap table and getTruePositiveLesions, written as in C++."""
    six = ndimage.generate_binary_structure(3, 1)

    def relabel(mask):
        lab, n = ndimage.label(mask, six)
        keep = np.bincount(lab.ravel(), minlength=n + 1) * voxel_mm3 > min_mm3
        keep[0] = False
        lut = np.zeros(n + 1, dtype=np.int64)
        lut[keep] = np.arange(1, keep.sum() + 1)
        return lut[lab], int(keep.sum())

    rl, nr = relabel(ref)
    tl, nt = relabel(pred)
    table = np.zeros((nr + 1, nt + 1), dtype=np.int64)
    np.add.at(table, (rl.ravel(), tl.ravel()), 1)

    def true_positives(tab):
        n_rows, n_cols = tab.shape
        row_tp, col_sum = tab[:, 1:].sum(axis=1), tab.sum(axis=0)
        found = 0
        for i in range(1, n_rows):
            if not row_tp[i] / (row_tp[i] + tab[i, 0]) > alpha:
                continue
            cols = sorted(range(1, n_cols), key=lambda j: (-tab[i, j], j))
            share, k, failed = 0.0, 0, False
            while share < gamma and k < n_rows and k < len(cols) and not failed:
                failed = tab[0, cols[k]] / col_sum[cols[k]] > beta
                if not failed:
                    share += tab[i, cols[k]] / row_tp[i]
                k += 1
            found += not failed
        return found

    if nr == 0 or nt == 0:
        return nr, nt, 0, 0
    return nr, nt, true_positives(table), true_positives(table.T)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_overlap_rule_matches_naive_isles22(connectivity):
    rng = np.random.default_rng(connectivity)
    rule = LesionRule(connectivity=connectivity)
    for _ in range(3):
        noise = rng.random((24, 24, 24))
        ref = ndimage.gaussian_filter(noise, 1.0) > 0.56
        pred = ndimage.gaussian_filter(noise + 0.4 * rng.random(noise.shape), 1.0) > 0.75
        s = summary(pred, ref, rule)
        nr, npred, tp, fp, dice = naive_isles(pred, ref, connectivity)
        assert (s["n_ref"], s["n_pred"], s["tp"], s["fp"]) == (nr, npred, tp, fp)
        assert s["f1"] == pytest.approx(tp / (tp + 0.5 * (fp + nr - tp)))
        assert s["lesion_dice"] == pytest.approx(dice)


def test_anima_rule_matches_naive_anima():
    rng = np.random.default_rng(7)
    for spacing in [(1.0, 1.0, 1.0), (0.5, 1.0, 1.0), (1.0, 1.5, 2.0)]:
        for weight, level in [(0.5, 0.56), (1.0, 0.56), (1.0, 0.54)]:
            field = ndimage.gaussian_filter(rng.random((24, 24, 24)), 1.0)
            other = ndimage.gaussian_filter(rng.random((24, 24, 24)), 1.0)
            ref = field > 0.56
            pred = field + weight * (other - 0.5) > level
            s = summary(pred, ref, "msseg", spacing=spacing)
            expected = naive_anima(pred, ref, float(np.prod(spacing)))
            assert (s["n_ref"], s["n_pred"], s["tp"], s["tp_pred"]) == expected


# ---------------------------------------------------------------- real masks against panoptica


@pytest.mark.realdata
def test_panoptica_preset_matches_panoptica_on_real_masks():
    if not MASKS.is_dir():
        pytest.skip(f"{MASKS} not found")
    panoptica = pytest.importorskip("panoptica")
    panoptica.disable_citation_reminder()
    evaluator = panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.SEMANTIC,
        instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),
        instance_matcher=panoptica.NaiveThresholdMatching(
            matching_metric=panoptica.Metric.IOU, matching_threshold=0.5
        ),
        instance_metrics=[panoptica.Metric.IOU],
        global_metrics=[panoptica.Metric.DSC],
    )
    rng = np.random.default_rng(0)
    for case in ("patient02", "patient07", "patient25", "patient26"):
        img = read_image(MASKS / f"{case}_gt.nii.gz")
        ref = img.array > 0
        for kind in ("erode", "dilate", "shift", "drop", "noise"):
            pred = perturb_mask(ref, kind, rng)
            ours = metrics.lesion_metrics(pred, ref, img.spacing, "panoptica").summary
            theirs = evaluator.evaluate(
                pred.astype(np.uint8), ref.astype(np.uint8), voxelspacing=img.spacing
            )["ungrouped"]
            got = (ours["n_ref"], ours["n_pred"], ours["tp"], ours["fp"], ours["fn"])
            want = (
                theirs.n_ref_instances,
                theirs.n_pred_instances,
                theirs.tp,
                theirs.fp,
                theirs.fn,
            )
            assert got == want, (case, kind)
            assert ours["RQ"] == pytest.approx(theirs.rq, abs=1e-12), (case, kind)
            assert ours["SQ"] == pytest.approx(theirs.sq, abs=1e-9), (case, kind)


def test_dice_alone_matches_voxel_metrics():
    rng = np.random.default_rng(3)
    a = rng.random((12, 10, 8)) > 0.7
    b = rng.random((12, 10, 8)) > 0.6
    assert metrics.dice(a, b) == pytest.approx(metrics.voxel_metrics(a, b, (1, 1, 1))["Dice"])
    empty = np.zeros((4, 4, 4), bool)
    assert math.isnan(metrics.dice(empty, empty))
    assert metrics.dice(empty, a[:4, :4, :4] | True) == 0.0
