"""Smoke test of scripts/baseline_monai.py: trains, predicts and scores a tiny split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import load_script

from segmenter.data.synthetic import PhantomSpec, write_dataset


def test_baseline_runs_on_our_split_and_writes_an_evaluate_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_script("baseline_monai")
    dataset = write_dataset(tmp_path, 4, seed=1, spec=PhantomSpec(size=40))
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (dataset / "labelsTr").iterdir())
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ids[:3], "val": ids[3:]}]))
    out = tmp_path / "baseline"
    argv = ["--dataset", str(dataset), "--splits", str(splits), "--minutes", "0.01",
            "--out", str(out), "--patch", "32", "32", "32"]  # fmt: skip
    assert module.main(argv) == 0
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    (case,) = summary["metric_per_case"]  # the one validation case of the split
    assert case["reference_file"].endswith(f"{ids[3]}.nii.gz")
    assert "MONAI baseline, fold 0: lesion recall" in capsys.readouterr().out


def test_baseline_rounds_a_thick_slice_patch_up_to_what_monais_unet_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_script("baseline_monai")
    assert module.monai_patch([160, 160, 12]) == (160, 160, 16)
    assert module.monai_patch([80, 80, 80]) == (80, 80, 80)
    dataset = write_dataset(tmp_path, 2, seed=2, spec=PhantomSpec(size=24))
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (dataset / "labelsTr").iterdir())
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ids[:1], "val": ids[1:]}]))
    argv = ["--dataset", str(dataset), "--splits", str(splits), "--minutes", "0.01",
            "--out", str(tmp_path / "baseline"), "--patch", "24", "24", "12"]  # fmt: skip
    assert module.main(argv) == 0  # a 12-slice patch through UNet(strides 2^4) would fail
    assert "rounded up to [32, 32, 16]" in capsys.readouterr().out
