"""Tests for segmenter.workflows.compare_stats: spread over replicates and paired differences
from compare's rows."""

from __future__ import annotations

import csv
import io
import math

import pytest

from segmenter.workflows.compare_stats import (
    STATISTICS_COLUMNS,
    statistics_csv,
    statistics_lines,
    variant_statistics,
)


def _row(variant: str, fold: int, seed: int, case: str, dice: float, tp: int, fp: int, fn: int):
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan
    return {
        "variant": variant, "fold": fold, "seed": seed, "case_id": case, "dice": dice,
        "lesion_f1": f1, "tp": tp, "fp": fp, "fn": fn,
    }  # fmt: skip


ROWS = [
    _row("ref", 0, 0, "a", 0.50, 1, 1, 1),
    _row("ref", 0, 0, "b", 0.70, 2, 0, 0),
    _row("ref", 1, 0, "c", 0.60, 0, 0, 2),
    _row("new", 0, 0, "a", 0.60, 2, 0, 0),
    _row("new", 0, 0, "b", 0.80, 2, 0, 0),
    _row("new", 1, 0, "c", 0.70, 1, 0, 1),
    _row("new", 1, 0, "z", 0.90, 1, 0, 0),  # a case the reference lacks: not paired
]


def test_replicate_values_spread_and_pairs() -> None:
    stats = {(s.variant, s.metric): s for s in variant_statistics(ROWS, "ref")}
    ref_dice = stats["ref", "dice"]
    assert ref_dice.replicates == pytest.approx((0.60, 0.60))  # mean over each fold's cases
    assert ref_dice.sd == pytest.approx(0.0) and ref_dice.versus is None
    # pooled F1 per replicate from summed counts: fold 0: tp 3, fp 1, fn 1 -> 6/8; fold 1: 0
    assert stats["ref", "lesion_f1"].replicates == pytest.approx((0.75, 0.0))
    new_dice = stats["new", "dice"]
    assert new_dice.replicates == pytest.approx((0.70, 0.80))
    assert new_dice.mean == pytest.approx(0.75) and new_dice.sd == pytest.approx(0.0707, abs=1e-4)
    v = new_dice.versus
    assert v is not None and v.n == 3 and (v.wins, v.losses) == (3, 0)
    assert v.mean == pytest.approx(0.10)
    assert v.p_value == pytest.approx(2 / 8)  # every sign the same: 2 of 2^3 patterns


def test_unknown_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="reference variant 'x'"):
        variant_statistics(ROWS, "x")


def test_csv_and_printed_table() -> None:
    stats = variant_statistics(ROWS, "ref")
    table = list(csv.DictReader(io.StringIO(statistics_csv(stats))))
    assert tuple(table[0]) == STATISTICS_COLUMNS
    assert len(table) == 4
    new_dice = next(r for r in table if (r["variant"], r["metric"]) == ("new", "dice"))
    assert (new_dice["pairs"], new_dice["diff_mean"], new_dice["wins"]) == ("3", "0.1000", "3")
    lines = statistics_lines(stats)
    assert len(lines) == 5 and "(reference, ref)" in lines[1]
    assert "+0.100" in lines[3] and "3/0" in lines[3]
