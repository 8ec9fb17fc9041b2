"""scripts/bench_predict.py: its run folder predicts through the CLI, its MONAI reference writes a
mask, and a whole-process timing reports seconds and peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tiny import load_script

from segmenter.cli import main
from segmenter.io import read_image


def _bench():  # the script as a module
    return load_script("bench_predict")


def test_the_random_run_predicts_and_the_monai_reference_writes_a_mask(tmp_path: Path) -> None:
    bench = _bench()
    scans = bench.scan_files(tmp_path, "none", (40, 44, 36), quick=True)
    run = bench.random_run("configs/ms_lesions.yaml", tmp_path / "run", quick=True)
    out = tmp_path / "ours.nii.gz"
    argv = ["predict", "--model", str(run), "--input", *map(str, scans), "--output", str(out),
            "--device", "cpu", "--no-tta"]  # fmt: skip
    assert main(argv) == 0
    assert read_image(out).array.shape == (40, 44, 36)
    bench.monai_predict([str(s) for s in scans], str(tmp_path / "monai.nii.gz"), False, 32)
    mask = read_image(tmp_path / "monai.nii.gz").array
    assert mask.shape == (40, 44, 36) and set(np.unique(mask)) <= {0, 1}


def test_a_timed_child_reports_seconds_and_its_peak_memory() -> None:
    bench = _bench()
    code = "import numpy as np; a = np.ones(64 * 2**20, np.uint8); a[::4096] = 2"
    timing = bench.run_timed([sys.executable, "-c", code])
    assert timing.seconds > 0 and timing.peak_mb > 64


def test_predicts_path_gives_the_masks_of_the_plain_eight_pass_path(
    trained_run: Path, phantoms: Path
) -> None:
    scores = _bench().fidelity(str(trained_run), str(phantoms / "imagesTs"))
    assert len(scores) >= 2 and min(scores) >= 0.99
