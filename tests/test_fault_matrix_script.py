"""scripts/fault_matrix.py: fault specs, the table, and an exit code that says whether every row
was handled."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_faults import fm


def test_fault_specs_round_trip_and_bad_ones_are_refused() -> None:
    fault = fm.Fault.parse("kill@write:last.pt#2")
    assert (fault.action, fault.moment, fault.target, fault.count) == (
        "kill",
        "write",
        "last.pt",
        2,
    )
    assert str(fault) == "kill@write:last.pt#2"
    assert fm.Fault.parse("SIGTERM@backward#3") == fm.Fault("SIGTERM", "backward", 3)
    for bad in ("kill@forward#1", "kill@backward", "SIGFOO@backward#1", "backward#1"):
        with pytest.raises(ValueError, match="bad fault"):
            fm.Fault.parse(bad)


@pytest.mark.parametrize(("handled", "code"), [(True, 0), (False, 1)])
def test_the_matrix_exits_0_only_when_every_row_is_handled(
    handled: bool,
    code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [fm.Row("SIGTERM", "train", "exit 143", True, 0),
            fm.Row("full disk", "predict", "exit 1", handled, int(not handled))]  # fmt: skip
    cases = [(f"case{i}", lambda ctx, r=row: r) for i, row in enumerate(rows)]
    monkeypatch.setattr(fm, "CASES", cases)
    assert fm.main(["--workdir", str(tmp_path)]) == code
    out = capsys.readouterr().out
    assert "| fault | command | what happened | handled | data lost |" in out
    assert (
        f"| full disk | predict | exit 1 | {'yes' if handled else 'NO'} | {int(not handled)} |"
        in out
    )
    assert f"2 faults tried, {1 + handled} handled, data lost in {int(not handled)}" in out


def test_a_case_that_breaks_is_a_row_not_handled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ctx: object) -> object:
        raise RuntimeError("no disk")

    monkeypatch.setattr(fm, "CASES", [("broken", broken)])
    ctx = fm.Context(root=tmp_path, dataset=tmp_path, rng=fm.random.Random(0))
    (row,) = fm.run_matrix(ctx)
    assert not row.handled and row.data_lost == 1 and "no disk" in row.happened


def test_the_bad_input_table_counts_by_command_and_names_what_was_not_handled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import bad_input_cases

    found = [bad_input_cases.Row("empty file", "verify", "exit 2: ...", True, 0),
             bad_input_cases.Row("NaN voxels", "predict", "exit 2: ...", True, 0),
             bad_input_cases.Row("4D scan", "predict", "exit 1: Traceback", False, 1)]  # fmt: skip
    fake = types.SimpleNamespace(bad_input_rows=lambda workdir: found)
    monkeypatch.setitem(sys.modules, "bad_input_cases", fake)
    rows, table = fm.bad_input_table(tmp_path)
    assert [r.handled for r in rows] == [True, True, False]
    assert "| verify | 1 | 1 | 0 |" in table and "| predict | 2 | 1 | 1 |" in table
    assert "3 bad inputs tried, 2 handled, data lost in 1" in table
    assert "NOT HANDLED: 4D scan | predict | exit 1: Traceback" in table
