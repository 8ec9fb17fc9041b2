from __future__ import annotations

import json
from pathlib import Path

import pytest

from segmenter.workflows.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole demo path (synth -> train -> predict -> evaluate), scaled down for CI."""
    summary = run_demo(tmp_path, minutes=0.1, n_train=8, n_test=2, size=32)
    out = capsys.readouterr().out
    assert "held-out phantoms: lesion recall" in out
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.nii.gz")) == [
        "phantom_test_000.nii.gz", "phantom_test_001.nii.gz",
    ]  # fmt: skip
    on_disk = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert on_disk["n_cases"] == summary["n_cases"] == 2
    assert "pooled" in on_disk["lesion"]
