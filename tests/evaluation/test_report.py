"""Tests for segmenter.evaluation.report on hand-built case results: NaN-aware means, pooled lesion
counts, the printed table, ``lesions.csv`` and ``summary.json`` text."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segmenter.evaluation.lesions import PRESETS
from segmenter.evaluation.metrics import LesionRecord
from segmenter.evaluation.report import (
    COUNT_KEYS,
    VOXEL_KEYS,
    CasePair,
    CaseResult,
    format_table,
    lesions_csv_text,
    measure_case,
    nan_mean,
    summarise,
    summary_json,
    write_report,
)

NAN = math.nan


def voxel_block(dice: float, hd95: float) -> dict[str, float]:
    """Voxel metrics of one label: every key present, counts 0."""
    block = dict.fromkeys(VOXEL_KEYS + COUNT_KEYS, 0.0)
    block.update(Dice=dice, IoU=dice, HD95=hd95)
    return block


def lesion_block(counts: tuple[int, ...], rates: tuple[float, ...], bins: dict) -> dict[str, Any]:
    """A lesion summary: counts (n_ref, n_pred, tp, fp, fn, tp_pred), rates (recall,
    precision, f1, lesion_dice), bins ``{label: (n, detected)}``."""
    n_ref, n_pred, tp, fp, fn, tp_pred = counts
    recall, precision, f1, lesion_dice = rates
    by_size = {
        k: {"n": n, "detected": d, "recall": d / n if n else NAN} for k, (n, d) in bins.items()
    }
    counted = {"n_ref": n_ref, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn, "tp_pred": tp_pred}
    ratios = {"recall": recall, "precision": precision, "f1": f1, "lesion_dice": lesion_dice}
    extra = {"fp_per_case": fp, "count_diff": abs(n_pred - n_ref), "recall_by_size": by_size}
    return counted | ratios | extra


def result(
    case_id: str,
    voxel: dict[str, dict],
    lesion: dict,
    lesions: Sequence[LesionRecord] = (),
    affine: np.ndarray | None = None,
) -> CaseResult:
    """A case result as :func:`measure_case` builds it, from hand-written blocks."""
    pair = CasePair(case_id, Path(f"pred/{case_id}.nii.gz"), Path(f"ref/{case_id}.nii.gz"))
    return CaseResult(pair, voxel, lesion, list(lesions), np.eye(4) if affine is None else affine)


@pytest.fixture
def three_cases() -> list[CaseResult]:
    """One lesion found of two; a lesion-free case (every ratio NaN); one found, one false."""
    a = result(
        "a",
        {"1": voxel_block(0.5, 2.0)},
        lesion_block(
            (2, 1, 1, 0, 1, 1), (0.5, 1.0, 2 / 3, 0.4), {"0-10": (1, 0), "10-inf": (1, 1)}
        ),
    )
    b = result(
        "b",
        {"1": voxel_block(NAN, NAN)},
        lesion_block((0, 0, 0, 0, 0, 0), (NAN, NAN, NAN, NAN), {"0-10": (0, 0), "10-inf": (0, 0)}),
    )
    c = result(
        "c",
        {"1": voxel_block(1.0, 0.0)},
        lesion_block(
            (1, 2, 1, 1, 0, 1), (1.0, 0.5, 2 / 3, 0.9), {"0-10": (1, 1), "10-inf": (0, 0)}
        ),
    )
    return [a, b, c]


def test_nan_mean_skips_none_and_nan() -> None:
    assert nan_mean([1.0, None, NAN, 3.0]) == (2.0, 2)
    assert nan_mean([np.float32(0.5), 1]) == (0.75, 2)
    mean, n = nan_mean([None, NAN])
    assert math.isnan(mean) and n == 0


def test_means_are_nan_aware_and_count_their_cases(three_cases: list[CaseResult]) -> None:
    s = summarise(three_cases, "isles22", PRESETS["isles22"])
    assert s["n_cases"] == 3 and s["preset"] == "isles22"
    assert s["lesion_rule"]["connectivity"] == 26 and "lesion recall" in s["empty_policy"]
    assert [c["case_id"] for c in s["metric_per_case"]] == ["a", "b", "c"]
    assert s["metric_per_case"][0]["reference_file"] == str(Path("ref/a.nii.gz"))
    assert s["mean"]["1"]["Dice"] == 0.75 and s["mean"]["1"]["n_cases"]["Dice"] == 2
    assert s["mean"]["1"]["HD95"] == 1.0 and s["mean"]["1"]["n_cases"]["TP"] == 3
    assert s["foreground_mean"]["Dice"] == 0.75
    lesion = s["lesion"]
    assert lesion["recall"] == 0.75 and lesion["n_cases"]["recall"] == 2
    assert lesion["precision"] == 0.75 and lesion["f1"] == pytest.approx(2 / 3)
    assert lesion["n_ref"] == 1.0 and lesion["n_cases"]["n_ref"] == 3  # counts are never NaN
    assert lesion["recall_by_size"] == {
        "0-10": {"recall": 0.5, "n_cases": 2},
        "10-inf": {"recall": 1.0, "n_cases": 1},
    }
    assert "RQ" not in lesion


def test_pooled_counts_sum_lesions_over_cases(three_cases: list[CaseResult]) -> None:
    pooled = summarise(three_cases, "isles22", PRESETS["isles22"])["lesion"]["pooled"]
    counts = tuple(pooled[k] for k in ("n_ref", "n_pred", "tp", "fp", "fn", "tp_pred"))
    assert counts == (3, 3, 2, 1, 1, 2)
    assert pooled["recall"] == pooled["precision"] == pytest.approx(2 / 3)
    assert pooled["f1"] == pytest.approx(2 / (2 + 0.5 * 2))
    assert pooled["recall_by_size"] == {
        "0-10": {"n": 2, "detected": 1, "recall": 0.5},
        "10-inf": {"n": 1, "detected": 1, "recall": 1.0},
    }
    empty = summarise(three_cases[1:2], "isles22", PRESETS["isles22"])["lesion"]["pooled"]
    assert all(math.isnan(empty[k]) for k in ("recall", "precision", "f1"))


def test_preset_keys_are_averaged_where_reported(three_cases: list[CaseResult]) -> None:
    three_cases[2].lesion["RQ"] = 0.5
    lesion = summarise(three_cases, "panoptica", PRESETS["panoptica"])["lesion"]
    assert lesion["RQ"] == 0.5 and lesion["n_cases"]["RQ"] == 1
    assert "SQ" not in lesion


def test_foreground_mean_averages_the_labels(three_cases: list[CaseResult]) -> None:
    three_cases[0].metrics["2"] = voxel_block(NAN, NAN)
    three_cases[2].metrics["2"] = voxel_block(0.0, NAN)
    s = summarise(three_cases, "isles22", PRESETS["isles22"])
    assert list(s["mean"]) == ["1", "2"]
    assert s["mean"]["2"]["Dice"] == 0.0 and s["mean"]["2"]["n_cases"]["Dice"] == 1
    assert s["foreground_mean"]["Dice"] == 0.375  # (0.75 + 0.0) / 2
    assert s["foreground_mean"]["HD95"] == 1.0  # label 2 has no HD95 in any case


def test_measure_case_scores_each_label_and_lesions_on_the_foreground() -> None:
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:9, 6:9, 6:9] = 2
    pred = ref.copy()
    pred[6:9, 6:9, 6:9] = 1  # the label-2 lesion found, as label 1
    pair = CasePair("m", Path("p.nii.gz"), Path("r.nii.gz"))
    r = measure_case(pair, pred, ref, (1.0, 1.0, 1.0), np.eye(4), PRESETS["isles22"], (0, 10, 1e9))
    assert set(r.metrics) == {"1", "2"}
    assert r.metrics["2"]["Dice"] == 0.0 and r.metrics["1"]["Dice"] == pytest.approx(54 / 81)
    assert (r.lesion["n_ref"], r.lesion["tp"], r.lesion["recall"]) == (2, 2, 1.0)
    assert [les.status for les in r.lesions] == ["TP", "TP", "TP", "TP"]
    only = measure_case(pair, pred, ref, (1, 1, 1), np.eye(4), PRESETS["isles22"], (0, 1e9), [2])
    assert set(only.metrics) == {"2"}
    empty = np.zeros_like(ref)
    none = measure_case(pair, empty, empty, (1, 1, 1), np.eye(4), PRESETS["isles22"], (0, 1e9))
    assert set(none.metrics) == {"1"} and math.isnan(none.metrics["1"]["Dice"])


def test_format_table_rows(three_cases: list[CaseResult]) -> None:
    lines = format_table(summarise(three_cases, "isles22", PRESETS["isles22"])).splitlines()
    assert lines[0].split() == [
        "case", "Dice", "HD95mm", "ref", "pred", "TP", "FP", "FN", "recall", "prec", "F1",
    ]  # fmt: skip
    assert [line.split() for line in lines[1:4]] == [
        ["a", "0.500", "2.0", "2", "1", "1", "0", "1", "0.500", "1.000", "0.667"],
        ["b", "nan", "nan", "0", "0", "0", "0", "0", "nan", "nan", "nan"],
        ["c", "1.000", "0.0", "1", "2", "1", "1", "0", "1.000", "0.500", "0.667"],
    ]
    assert lines[4] == "-" * len(lines[0])
    assert lines[5].split() == [
        "mean", "0.750", "1.0", "1.0", "1.0", "0.7", "0.3", "0.3", "0.750", "0.750", "0.667",
    ]  # fmt: skip
    assert lines[6].split() == ["pooled", "3", "3", "2", "1", "1", "0.667", "0.667", "0.667"]
    assert lines[7] == "lesion recall by size (mm3, pooled): 0-10: 0.50 (1/2), 10-inf: 1.00 (1/1)"
    assert len(lines) == 8
    assert len({len(line) for line in lines[:7]}) == 1  # aligned columns


def test_format_table_shortens_long_case_lists(three_cases: list[CaseResult]) -> None:
    lines = format_table(summarise(three_cases, "isles22", PRESETS["isles22"]), max_rows=2)
    rows = [line.split()[0] for line in lines.splitlines()[1:]]
    assert rows[:4] == ["a", "...", "-" * len(lines.splitlines()[0]), "mean"]


def test_lesions_csv_rows_in_world_and_voxel_coordinates() -> None:
    affine = np.array([[2.0, 0, 0, 10.0], [0, 1.0, 0, -5.0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    records = [
        LesionRecord("ref", 1, 12.0, (1.0, 2.0, 3.0), (1, 2), 0.75, "TP"),
        LesionRecord("pred", 1, 4.5, (0.5, 0.25, 0.0), (), NAN, "ignored"),
    ]
    text = lesions_csv_text([result("x", {}, {}, records, affine)])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:4] == ["case_id", "source", "lesion_id", "volume_mm3"]
    assert rows[0][-3:] == ["matched_ids", "dice", "status"]
    assert rows[1] == ["x", "ref", "1", "12.000", "12.00", "-3.00", "9.00",
                       "1.00", "2.00", "3.00", "1;2", "0.7500", "TP"]  # fmt: skip
    assert rows[2][-3:] == ["", "", "ignored"]  # no matches; NaN Dice left empty
    assert rows[2][4:7] == ["11.00", "-4.75", "0.00"]
    assert text.endswith("\n") and "\r" not in text


def test_summary_json_is_strict_json() -> None:
    text = summary_json({"nan": NAN, "inf": math.inf, "neg": -math.inf, 1: (np.float32(0.5), 2)})
    assert json.loads(text) == {"nan": None, "inf": "inf", "neg": "-inf", "1": [0.5, 2]}
    assert "NaN" not in text


def test_write_report_writes_both_files(three_cases: list[CaseResult], tmp_path: Path) -> None:
    summary = summarise(three_cases, "isles22", PRESETS["isles22"])
    write_report(three_cases, summary, tmp_path / "out")
    assert (tmp_path / "out" / "summary.json").read_text() == summary_json(summary)
    assert (tmp_path / "out" / "lesions.csv").read_text() == lesions_csv_text(three_cases)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lesions.csv", "summary.json"]
