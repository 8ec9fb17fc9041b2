"""The bad-input matrix (``tests/bad_input_cases.py``): every broken scan, label, config and
checkpoint, given to the real command in-process, is refused with exit code 2 and one line naming
the file and the problem, no traceback and nothing written, or accepted with a warning where
that is the decision."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from bad_input_cases import (
    BadInput,
    Call,
    Outcome,
    World,
    all_cases,
    bad_input_rows,
    judge,
    snapshot,
)

from segmenter.cli import main

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_refused_in_one_line_or_accepted_as_decided(
    case: BadInput,
    phantoms: Path,
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World(phantoms, trained_run, tmp_path)
    call = case.make(world)
    roots = (tmp_path, phantoms, trained_run)
    before = snapshot(*roots)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="segmenter"):
        code = main(call.argv)
    printed = capsys.readouterr()
    warnings = "\n".join(f"WARNING {r.name}: {r.getMessage()}" for r in caplog.records)
    outcome = Outcome(code, printed.out, printed.err + warnings, before, snapshot(*roots))
    assert judge(case, call, outcome) == [], (code, printed.out[-800:], printed.err[-800:])


def test_the_matrix_covers_every_command_and_both_decisions() -> None:
    commands = {c.command for c in CASES}
    assert commands == {"verify", "plan", "train", "predict", "evaluate"}
    assert any(c.accepted for c in CASES) and sum(not c.accepted for c in CASES) > 60


def test_judge_fails_a_command_that_writes_or_prints_a_traceback(tmp_path: Path) -> None:
    case = CASES[0]
    call = Call(["predict"], names=tmp_path / "scan_0000.nii.gz", output=tmp_path / "out")
    good = f"error: {call.names}: voxel size (pixdim) 0x1x1 mm is not positive and finite\n"
    quiet = Outcome(2, "", good, {}, {})
    assert judge(case, call, quiet) == []
    noisy = Outcome(1, "", "Traceback (most recent call last):\n", {}, {"x.tmp.nii.gz": (1, 1)})
    wrong = judge(case, call, noisy)
    assert "printed a traceback" in wrong and "exit 1, expected 2" in wrong
    assert any("temporary file" in w for w in wrong) and any("wrote 1 file" in w for w in wrong)


@pytest.mark.slow
def test_bad_input_rows_report_each_case_handled_with_no_data_lost(tmp_path: Path) -> None:
    picked = [c for c in CASES if c.id in {"verify-pixdim zero", "train-alias bomb"}]
    rows = bad_input_rows(picked, workdir=tmp_path)
    assert [(r.command, r.fault, r.handled, r.data_lost) for r in rows] == [
        ("verify", "pixdim zero", True, 0),
        ("train", "alias bomb", True, 0),
    ]
    assert rows[1].happened.startswith("exit 2: error: ") and "alias bomb" in rows[1].happened
