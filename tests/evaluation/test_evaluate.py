from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from segmenter.config import EvaluationConfig
from segmenter.errors import InputError
from segmenter.evaluation.evaluate import evaluate_folders, pair_cases
from segmenter.evaluation.metrics import DEFAULT_SIZE_BINS_MM3
from segmenter.io import write_image

SPACING_AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # voxel 2 mm3


def cube(mask: np.ndarray, corner: tuple[int, int, int], edge: int, value: int = 1) -> None:
    """Set an edge^3 cube of ``mask`` starting at ``corner`` to ``value``."""
    x, y, z = corner
    mask[x : x + edge, y : y + edge, z : z + edge] = value


def write_pair(root: Path, case: str, ref: np.ndarray, pred: np.ndarray) -> None:
    write_image(root / "ref" / f"{case}.nii.gz", ref.astype(np.uint8), SPACING_AFFINE)
    write_image(root / "pred" / f"{case}.nii.gz", pred.astype(np.uint8), SPACING_AFFINE)


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    # case a: two reference lesions, one found exactly, one missed; one false positive voxel.
    ref = np.zeros((24, 24, 12), np.uint8)
    cube(ref, (2, 2, 2), 4)  # 64 voxels = 128 mm3
    cube(ref, (14, 14, 6), 2)  # 8 voxels = 16 mm3, missed
    pred = np.zeros_like(ref)
    cube(pred, (2, 2, 2), 4)
    pred[20, 2, 2] = 1  # one-voxel false positive
    write_pair(tmp_path, "case_a", ref, pred)
    # case b: lesion-free reference and empty prediction (voxel Dice NaN by policy)
    empty = np.zeros((24, 24, 12), np.uint8)
    write_pair(tmp_path, "case_b", empty, empty)
    return tmp_path


def test_summary_schema_and_values(folders: Path) -> None:
    summary = evaluate_folders(folders / "pred", folders / "ref", out_dir=folders / "out")
    on_disk = json.loads((folders / "out" / "summary.json").read_text())
    assert set(on_disk) >= {"metric_per_case", "mean", "foreground_mean", "lesion", "empty_policy"}
    cases = {c["case_id"]: c for c in on_disk["metric_per_case"]}
    a = cases["case_a"]
    assert a["prediction_file"].endswith("case_a.nii.gz")
    assert a["reference_file"].endswith("case_a.nii.gz")
    m = a["metrics"]["1"]
    assert {"Dice", "IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref", "HD95"} <= set(m)
    assert m["TP"] == 64 and m["FP"] == 1 and m["FN"] == 8
    assert m["Dice"] == pytest.approx(2 * 64 / (65 + 72))
    les = a["lesion"]
    assert {"recall", "precision", "f1", "n_ref", "n_pred", "tp", "fp", "fn"} <= set(les)
    assert {"lesion_dice", "recall_by_size"} <= set(les)
    assert (les["n_ref"], les["n_pred"], les["tp"], les["fp"], les["fn"]) == (2, 2, 1, 1, 1)
    assert les["recall"] == pytest.approx(0.5)
    assert les["precision"] == pytest.approx(0.5)
    assert les["f1"] == pytest.approx(1 / (1 + 1))
    assert les["lesion_dice"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2
    # the 16 mm3 lesion lands in the 10-100 bin and was missed; the 128 mm3 one in 100-1000
    assert les["recall_by_size"]["10-100"]["n"] == 1
    assert les["recall_by_size"]["10-100"]["recall"] == 0.0
    assert les["recall_by_size"]["100-1000"]["recall"] == 1.0
    b = cases["case_b"]
    assert b["metrics"]["1"]["Dice"] is None  # NaN written as null: both empty
    assert b["lesion"]["recall"] is None
    # averages are NaN-aware and say how many cases they cover
    assert on_disk["mean"]["1"]["Dice"] == pytest.approx(m["Dice"])
    assert on_disk["mean"]["1"]["n_cases"]["Dice"] == 1
    assert on_disk["lesion"]["recall"] == pytest.approx(0.5)
    assert on_disk["lesion"]["n_cases"]["recall"] == 1
    assert on_disk["lesion"]["pooled"]["tp"] == 1
    assert on_disk["foreground_mean"]["Dice"] == pytest.approx(m["Dice"])
    assert math.isnan(summary["metric_per_case"][1]["metrics"]["1"]["Dice"])


def test_lesions_csv_rows(folders: Path) -> None:
    evaluate_folders(folders / "pred", folders / "ref", out_dir=folders / "out")
    with open(folders / "out" / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    statuses = sorted((r["source"], r["status"]) for r in rows if r["case_id"] == "case_a")
    assert statuses == [("pred", "FP"), ("pred", "TP"), ("ref", "FN"), ("ref", "TP")]
    big = next(r for r in rows if r["source"] == "ref" and r["status"] == "TP")
    assert float(big["volume_mm3"]) == pytest.approx(128.0)
    # centroid of voxels 2..5 is 3.5; z spacing 2 mm gives 7 mm
    assert float(big["centroid_x_mm"]) == pytest.approx(3.5)
    assert float(big["centroid_z_mm"]) == pytest.approx(7.0)
    assert float(big["dice"]) == pytest.approx(1.0)
    assert big["matched_ids"] != ""


def test_presets_change_the_rule(folders: Path) -> None:
    out = evaluate_folders(folders / "pred", folders / "ref", preset="panoptica", out_dir=folders)
    assert out["preset"] == "panoptica"
    assert "RQ" in out["metric_per_case"][0]["lesion"]
    atlas = evaluate_folders(folders / "pred", folders / "ref", preset="atlas", out_dir=folders)
    assert atlas["lesion_rule"]["connectivity"] == 6
    with pytest.raises(InputError, match="unknown preset 'nope'; valid presets: isles22"):
        evaluate_folders(folders / "pred", folders / "ref", preset="nope")


def test_missing_prediction_is_one_line(folders: Path) -> None:
    (folders / "pred" / "case_b.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case_b.nii.gz: no prediction for case 'case_b'"):
        pair_cases(folders / "pred", folders / "ref")


def test_prediction_without_reference(folders: Path) -> None:
    write_image(folders / "pred" / "case_c.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(InputError, match=r"no reference for case 'case_c'"):
        pair_cases(folders / "pred", folders / "ref")


def test_shape_mismatch_is_input_error_and_writes_nothing(folders: Path) -> None:
    write_image(folders / "pred" / "case_b.nii.gz", np.zeros((5, 5, 5), np.uint8), SPACING_AFFINE)
    with pytest.raises(InputError, match=r"case_b.nii.gz: shape \(5, 5, 5\) does not match"):
        evaluate_folders(folders / "pred", folders / "ref", out_dir=folders / "out")
    assert not (folders / "out" / "summary.json").exists()


def test_affine_mismatch_is_input_error(folders: Path) -> None:
    shifted = SPACING_AFFINE.copy()
    shifted[0, 3] = 5.0
    write_image(folders / "pred" / "case_b.nii.gz", np.zeros((24, 24, 12), np.uint8), shifted)
    with pytest.raises(InputError, match=r"geometry \(affine\) does not match"):
        evaluate_folders(folders / "pred", folders / "ref", out_dir=folders / "out")


def test_probability_map_is_rejected(folders: Path) -> None:
    prob = np.full((24, 24, 12), 0.3, np.float32)
    write_image(folders / "pred" / "case_b.nii.gz", prob, SPACING_AFFINE)
    with pytest.raises(InputError, match="non-integer label values"):
        evaluate_folders(folders / "pred", folders / "ref", out_dir=folders / "out")


def test_multi_label_reports_each_label(tmp_path: Path) -> None:
    ref = np.zeros((10, 10, 10), np.uint8)
    cube(ref, (1, 1, 1), 3, value=1)
    cube(ref, (6, 6, 6), 3, value=2)
    pred = ref.copy()
    pred[6:9, 6:9, 6:9] = 1  # label 2 predicted as label 1: a lesion is still a lesion
    write_pair(tmp_path, "m", ref, pred)
    out = evaluate_folders(tmp_path / "pred", tmp_path / "ref", out_dir=tmp_path)
    metrics = out["metric_per_case"][0]["metrics"]
    assert set(metrics) == {"1", "2"}
    assert metrics["2"]["Dice"] == 0.0
    assert out["metric_per_case"][0]["lesion"]["recall"] == 1.0
    assert out["foreground_mean"]["Dice"] == pytest.approx((metrics["1"]["Dice"] + 0.0) / 2)


def test_config_default_size_bins_match_metrics() -> None:
    assert EvaluationConfig().size_bins_mm3 == tuple(DEFAULT_SIZE_BINS_MM3)
