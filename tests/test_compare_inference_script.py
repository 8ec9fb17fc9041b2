"""scripts/compare_inference.py: every setting of the grid is scored on the run's cases."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import load_script


def test_the_table_has_one_row_per_setting_and_the_first_agrees_with_itself(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_script("compare_inference")
    argv = ["--model", str(trained_run), "--overlaps", "0.5", "0.25", "--mirroring", "all", "none"]
    assert module.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.strip().startswith("overlap"))) + 1 :]
    assert [row.split()[:2] for row in table] == [
        ["0.5", "all"], ["0.5", "none"], ["0.25", "all"], ["0.25", "none"]
    ]  # fmt: skip
    assert table[0].split()[-1] == "1.0000"
    assert all(0.0 <= float(row.split()[-1]) <= 1.0 for row in table)
