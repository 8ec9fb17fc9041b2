"""Tests for segmenter.data.verify: every problem of a dataset found, exactly once, as one line.

Each problem ``verify_dataset`` names (see its module docstring) has a failure-path test on a
tiny dataset broken in one place; the layout problems it shares with ``load_dataset`` are
checked in ``test_layout.py``.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_dataset import edit_json, messages, rewrite

from segmenter.data.layout import load_dataset
from segmenter.data.verify import ORIGIN_ATOL_MM, SPACING_RTOL, verify_dataset
from segmenter.errors import InputError

REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def shifted(mm: float) -> Callable:
    def change(array: np.ndarray, affine: np.ndarray) -> tuple:
        affine[:3, 3] += [0.0, mm, 0.0]
        return array, affine

    return change


def scaled(factor: float) -> Callable:
    def change(array: np.ndarray, affine: np.ndarray) -> tuple:
        affine[:3, 2] *= factor
        return array, affine

    return change


def flipped(array: np.ndarray, affine: np.ndarray) -> tuple:
    affine[:3, 1] *= -1
    return array, affine


def cropped(array: np.ndarray, affine: np.ndarray) -> tuple:
    return array[:, :, :-1], affine


def with_value(value: float, dtype: type = np.float32) -> Callable:
    def change(array: np.ndarray, affine: np.ndarray) -> tuple:
        out = array.astype(dtype)
        out[1, 1, 1] = value
        return out, affine

    return change


def with_values(values: Sequence[float], dtype: type) -> Callable:
    """Set the first voxels (C order) to ``values``."""

    def change(array: np.ndarray, affine: np.ndarray) -> tuple:
        out = array.astype(dtype)
        out.flat[: len(values)] = list(values)
        return out, affine

    return change


def as_4d(array: np.ndarray, affine: np.ndarray) -> tuple:
    return np.stack([array, array], axis=-1), affine


def as_2d(array: np.ndarray, affine: np.ndarray) -> tuple:
    return array[:, :, 0], affine


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(600))


IMG = "imagesTr/case_b_0001.nii.gz"
LABEL = "labelsTr/case_b.nii.gz"


@pytest.mark.parametrize(
    ("target", "change", "expected"),
    [
        (IMG, cropped, "shape mismatch: 8x9x9, expected 8x9x10 as in case_b_0000.nii.gz"),
        (LABEL, cropped, "shape mismatch: 8x9x9, expected 8x9x10 as in case_b_0000.nii.gz"),
        (LABEL, shifted(0.5), "affine mismatch: origin off by 0.5 mm from case_b_0000.nii.gz"),
        (IMG, flipped, "affine mismatch: orientation differs from case_b_0000.nii.gz"),
        (IMG, scaled(1.5), "spacing mismatch: 1x1x1.8 mm, expected 1x1x1.2 mm"),
        (LABEL, with_value(2, np.uint8), "undeclared label values 2 (dataset.json labels: 0, 1)"),
        (LABEL, with_value(-1, np.int16), "undeclared label values -1 (dataset.json labels: 0, 1)"),
        (LABEL, with_value(0.5), "non-integer label values 0.5 (1 of 720 voxels)"),
        (IMG, with_value(np.nan), "NaN voxels: 1 of 720"),
        (IMG, with_value(np.inf), "inf voxels: 1 of 720"),
        (LABEL, with_value(np.nan), "NaN voxels: 1 of 720"),
        (LABEL, with_value(np.inf), "inf voxels: 1 of 720"),
        (
            LABEL,
            with_values(range(2, 8), np.uint8),
            "undeclared label values 2, 3, 4, 5, 6, ... (dataset.json labels: 0, 1)",
        ),
        (
            LABEL,
            with_values([5000, -3000], np.int16),  # a range too wide to test value by value
            "undeclared label values -3000, 5000 (dataset.json labels: 0, 1)",
        ),
        (
            LABEL,
            with_values([0.6, 0.5, 0.4, 0.3, 0.2, 0.1], np.float32),
            "non-integer label values 0.1, 0.2, 0.3, 0.4, 0.5, ... (6 of 720 voxels)",
        ),
        (IMG, as_4d, "4D image: shape 8x9x10x2, expected 3D"),
        (IMG, as_2d, "2D image: shape 8x9, expected 3D"),
        (IMG, truncate, "unreadable: header claims 8x9x10 voxels (2.88 kB from byte 352) but"),
        (LABEL, truncate, "unreadable: cannot read image"),  # header or voxels
        (IMG, random_bytes, "unreadable: cannot read image header ("),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_verify_finds_the_problem(
    dataset: Path, target: str, change: Callable, expected: str
) -> None:
    path = dataset / target
    if change in (truncate, random_bytes):
        change(path)
    else:
        rewrite(path, change)
    problems = verify_dataset(dataset)
    assert len(problems) == 1, problems
    assert problems[0].path == path
    assert problems[0].message.startswith(expected)
    assert str(problems[0]) == f"{path}: {problems[0].message}"
    assert "\n" not in str(problems[0])


def test_verify_compares_with_the_first_readable_channel(dataset: Path) -> None:
    random_bytes(dataset / "imagesTr" / "case_b_0000.nii.gz")
    rewrite(dataset / IMG, shifted(0.5))  # channel 1 now sets the geometry of the case
    found = messages(verify_dataset(dataset), dataset)
    assert len(found) == 2, found
    assert found[0].startswith("~/imagesTr/case_b_0000.nii.gz: unreadable: cannot read image")
    assert found[1].startswith(
        "~/labelsTr/case_b.nii.gz: affine mismatch: origin off by 0.5 mm from case_b_0001.nii.gz"
    )


def test_verify_rejects_complex_labels(dataset: Path) -> None:
    path = dataset / LABEL
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, img.affine), path)
    assert messages(verify_dataset(dataset), dataset) == [
        "~/labelsTr/case_b.nii.gz: bad header: complex voxels (complex64) are not supported: "
        "store the magnitude as a real-valued image"
    ]


def test_verify_tolerates_rounding_in_the_geometry(dataset: Path) -> None:
    rewrite(dataset / IMG, shifted(ORIGIN_ATOL_MM / 2))
    rewrite(dataset / LABEL, scaled(1 + SPACING_RTOL / 10))
    assert verify_dataset(dataset) == []


def test_verify_accepts_integer_valued_float_labels(dataset: Path) -> None:
    rewrite(dataset / LABEL, lambda a, aff: (a.astype(np.float32), aff))
    assert verify_dataset(dataset) == []


def test_verify_lists_every_problem_in_a_stable_order(dataset: Path) -> None:
    edit_json(dataset, labels=None, numTraining=5)
    (dataset / "imagesTr" / "case_a_0001.nii.gz").unlink()
    (dataset / "labelsTr" / "orphan.nii.gz").write_bytes(b"")
    (dataset / "labelsTr" / "readme.md").write_text("x")
    rewrite(dataset / IMG, with_value(np.nan))
    rewrite(dataset / LABEL, with_value(7, np.uint8))  # not reported: no declared labels
    expected = [
        "~/dataset.json: missing key 'labels'",
        "~/dataset.json: numTraining mismatch: dataset.json says 5, imagesTr has 2 cases",
        "~/labelsTr/readme.md: stray file: name does not match {case}.nii.gz",
        "~/imagesTr/case_a_0001.nii.gz: missing channel 1 (T1) of case case_a",
        "~/imagesTr/case_b_0001.nii.gz: NaN voxels: 1 of 720",
        "~/labelsTr/orphan.nii.gz: label without images: no orphan_XXXX.nii.gz in imagesTr",
        "~/labelsTr/orphan.nii.gz: unreadable: cannot read image header",
    ]
    found = messages(verify_dataset(dataset), dataset)
    assert [line[: len(e)] for line, e in zip(found, expected, strict=True)] == expected
    serial = messages(verify_dataset(dataset, workers=1, progress=True), dataset)
    assert serial == found


def test_verify_without_usable_dataset_json_reports_only_that(dataset: Path) -> None:
    edit_json(dataset, file_ending=None, channel_names={"a": "x"})
    assert messages(verify_dataset(dataset), dataset) == [
        "~/dataset.json: invalid 'channel_names': key 'a' is not a channel index (0, 1, ...)",
        "~/dataset.json: missing key 'file_ending'",
    ]


# ------------------------------------------------------------------------------------------
# real data (../shared/data beside the repository)


def real_datasets() -> list[Path]:
    if not REAL_DATA.is_dir():
        return []
    return sorted(p.parent for p in REAL_DATA.glob("*/dataset.json"))


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("root", real_datasets() or [None], ids=lambda p: p.name if p else "none")
def test_real_datasets_verify_clean(root: Path | None) -> None:
    if root is None:
        pytest.skip(f"no datasets under {REAL_DATA}")
    ds = load_dataset(root)
    assert len(ds.training) == ds.num_training > 0
    assert [str(p) for p in verify_dataset(root)] == []


@pytest.mark.realdata
def test_broken_copy_of_a_real_dataset(tmp_path: Path) -> None:
    source = REAL_DATA / "Dataset002_MSLesjak"
    if not (source / "dataset.json").is_file():
        pytest.skip(f"{source} not found")
    root = tmp_path / source.name
    for path in source.rglob("*"):
        if path.is_file():
            (root / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (root / path.relative_to(source)).symlink_to(path)
    cases = sorted(p.name for p in (source / "labelsTr").iterdir())
    first, second = (c.removesuffix(".nii.gz") for c in cases[:2])
    (root / "imagesTr" / f"{first}_0002.nii.gz").unlink()
    corrupt = root / "imagesTr" / f"{second}_0003.nii.gz"
    data = corrupt.read_bytes()
    corrupt.unlink()
    corrupt.write_bytes(gzip.compress(gzip.decompress(data)[:100_000]))  # header, few voxels

    with pytest.raises(InputError, match=rf"{first}_0002\.nii\.gz: missing channel 2 \(T1POST\)"):
        load_dataset(root)
    found = messages(verify_dataset(root), root)
    assert len(found) == 2, found
    assert found[0] == f"~/imagesTr/{first}_0002.nii.gz: missing channel 2 (T1POST) of case {first}"
    assert found[1].startswith(f"~/imagesTr/{second}_0003.nii.gz: unreadable: header claims ")
