"""Header faults drawn by ``tests/header_fuzz.py``: ``segmenter.io.read_image`` either reads a
finite, well-formed 3D image or refuses with one InputError line naming the file (never another
exception, never a hang), and ``segmenter verify`` on a one-case dataset built around the file
reports it in lines naming it, exit code 0 or 2, no traceback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from header_fuzz import base_image, fuzzed_nifti

from segmenter.cli import main
from segmenter.errors import InputError
from segmenter.io import Image, read_image

SEED = 14
EXAMPLES = 50
#: Seconds one read may take (the files are a few kB: anything near this is a hang).
READ_SECONDS = 5.0


def well_formed(img: Image) -> list[str]:
    """What is wrong with an image read_image returned (empty: nothing)."""
    wrong = []
    if img.array.ndim != 3 or min(img.array.shape) < 1:
        wrong.append(f"shape {img.array.shape}")
    if img.array.dtype.kind not in "biuf":
        wrong.append(f"voxel type {img.array.dtype}")
    elif not np.isfinite(img.array).all():
        wrong.append("non-finite voxels from finite data")
    matrix = img.affine[:3, :3]
    if not np.isfinite(img.affine).all() or abs(np.linalg.det(matrix)) < 1e-9:
        wrong.append(f"affine {img.affine.tolist()}")
    if not all(np.isfinite(s) and s > 0 for s in img.spacing):
        wrong.append(f"spacing {img.spacing}")
    elif not np.allclose(img.spacing, np.linalg.norm(matrix, axis=0), rtol=1e-3):
        wrong.append(f"spacing {img.spacing} against the affine")
    return wrong


def one_case_dataset(root: Path, scan: Path) -> Path:
    """A dataset whose only case is ``scan`` with a valid empty label on the base grid."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    scan.rename(root / "imagesTr" / "case_0000.nii.gz")
    base = base_image(SEED)
    nib.save(
        nib.Nifti1Image(np.zeros(base.shape, np.uint8), base.affine),
        root / "labelsTr" / "case.nii.gz",
    )
    meta = {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1},
            "numTraining": 1, "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "imagesTr" / "case_0000.nii.gz"


@pytest.mark.parametrize("example", range(EXAMPLES))
def test_a_fuzzed_header_reads_well_formed_or_refuses_in_one_line(
    example: int, tmp_path: Path
) -> None:
    path = tmp_path / ("scan.nii" if example % 2 else "scan.nii.gz")
    fields = fuzzed_nifti(path, SEED, example)
    start = time.perf_counter()
    try:
        img = read_image(path, dtype=np.float32)
    except InputError as exc:
        text = str(exc)
        assert text.startswith(f"{path}: ") and "\n" not in text, (fields, text)
    else:
        assert well_formed(img) == [], fields
    assert time.perf_counter() - start < READ_SECONDS, fields


@pytest.mark.parametrize("example", range(0, EXAMPLES, 5))
def test_verify_reports_a_fuzzed_header_in_lines_naming_it(
    example: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scan = tmp_path / "scan.nii.gz"
    fields = fuzzed_nifti(scan, SEED, example)
    try:
        read_image(scan)
        refused = False
    except InputError:
        refused = True
    root = tmp_path / "Dataset001_Fuzz"
    scan = one_case_dataset(root, scan)
    code = main(["verify", str(root)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, fields
    assert code in (0, 2), fields
    assert all(line.startswith(str(root)) for line in out.splitlines()), (fields, out)
    if refused:
        assert code == 2 and any(line.startswith(f"{scan}: ") for line in out.splitlines()), (
            fields, out,
        )  # fmt: skip
