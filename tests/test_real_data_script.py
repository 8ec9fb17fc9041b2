"""scripts/real_data_results.py: the per-case side-by-side comparison of two summaries."""

from __future__ import annotations

from typing import Any

from tiny import load_script


def _script() -> Any:
    return load_script("real_data_results")


def _case(case_id: str, dices: list[float | None], n_pred: int) -> dict[str, Any]:
    metrics = {str(i + 1): {"Dice": d} for i, d in enumerate(dices)}
    return {"case_id": case_id, "metrics": metrics, "lesion": {"n_pred": n_pred}}


def test_per_case_lines_match_cases_by_id_and_count_who_is_ahead() -> None:
    ours = {"metric_per_case": [
        _case("b", [0.8], 2),
        _case("a", [0.5, 0.7], 1),  # two labels: mean 0.6
        _case("only_ours", [0.9], 1),
        _case("tie", [0.702], 3),
        _case("no_dice", [None], 0),  # NaN Dice (both masks empty) is written as null
    ]}  # fmt: skip
    baseline = {"metric_per_case": [
        _case("a", [0.9], 40), _case("b", [0.3], 7), _case("tie", [0.7], 5),
        _case("no_dice", [0.4], 2), _case("only_base", [0.1], 9),
    ]}  # fmt: skip
    lines = _script().per_case_lines(ours, baseline)
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert list(rows) == ["a", "b", "no_dice", "only_base", "only_ours", "tie"]
    assert rows["a"] == ["0.600", "1", "0.900", "40"]
    assert rows["b"] == ["0.800", "2", "0.300", "7"]
    assert rows["no_dice"] == ["nan", "0", "0.400", "2"]
    assert rows["only_base"] == ["-", "-", "0.100", "9"]
    assert rows["only_ours"] == ["0.900", "1", "-", "-"]
    # b ahead for ours, a for the baseline; the tie (0.002) and the cases without both Dice
    # values count for neither
    assert lines[-1] == "Dice ahead by > 0.005: ours on 1 cases, the baseline on 1"
