"""A run folder written by an older main still predicts, with the same masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from segmenter.cli import main
from segmenter.io import read_image

FIXTURE = Path(__file__).parent / "fixtures" / "run_format_v0"


def test_run_folder_of_format_v0_predicts_the_masks_it_predicted_then(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    out = tmp_path / "out"
    argv = ["predict", "--model", str(run), "--input", str(run / "input"), "--output", str(out),
            "--save-probabilities", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    name = "phantom_test_000.nii.gz"
    mask, expected = read_image(out / name), read_image(FIXTURE / "expected" / name)
    assert expected.array.any()
    np.testing.assert_array_equal(mask.array, expected.array)
    np.testing.assert_allclose(mask.affine, expected.affine)
    prob = read_image(out / "probabilities" / name).array
    np.testing.assert_allclose(
        prob, read_image(FIXTURE / "expected" / "probabilities" / name).array, atol=1e-5
    )
