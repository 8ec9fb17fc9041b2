from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from segmenter.data import Problem, find_cases, load_dataset
from segmenter.errors import InputError
from segmenter.io import read_image, write_image
from segmenter.verify import ORIGIN_ATOL_MM, SPACING_RTOL, verify_dataset

SHAPE = (8, 9, 10)
CHANNELS = {"0": "FLAIR", "1": "T1"}
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def grid(spacing: tuple[float, float, float] = (1.0, 1.0, 1.2), origin=(10.0, -20.0, 5.0)):
    """Axis-aligned affine with a flipped first axis (as most scanners write)."""
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def lesion_mask(lesion: bool = True) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    if lesion:
        mask[2:4, 3:5, 4:6] = 1
    return mask


def make_dataset(
    root: Path,
    *,
    cases: tuple[str, ...] = ("case_a", "case_b"),
    lesion_free: tuple[str, ...] = (),
    test_cases: tuple[str, ...] = (),
    test_labels: tuple[str, ...] = (),
    channels: dict[str, str] = CHANNELS,
    meta: dict | None = None,
    ending: str = ".nii.gz",
) -> Path:
    """A tiny nnU-Net raw dataset: float32 channels and uint8 labels on one grid."""
    rng = np.random.default_rng(0)
    affine = grid()
    for sub, names in (("imagesTr", cases), ("imagesTs", test_cases)):
        for case in names:
            for c in range(len(channels)):
                image = rng.normal(size=SHAPE).astype(np.float32)
                write_image(root / sub / f"{case}_{c:04d}{ending}", image, affine)
    for case in cases:
        mask = lesion_mask(case not in lesion_free)
        write_image(root / "labelsTr" / f"{case}{ending}", mask, affine)
    for case in test_labels:
        write_image(root / "labelsTs" / f"{case}{ending}", lesion_mask(), affine)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    dataset_json = {
        "channel_names": channels,
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(cases),
        "file_ending": ending,
        "name": "Tiny",
    }
    dataset_json.update(meta or {})
    (root / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    return root


def edit_json(root: Path, **changes: object) -> None:
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def rewrite(path: Path, change: Callable[[np.ndarray, np.ndarray], tuple]) -> None:
    """Rewrite an image file with ``(array, affine) = change(array, affine)``."""
    img = read_image(path, ndim=None)
    array, affine = change(img.array, img.affine.copy())
    write_image(path, array, affine)


def messages(problems: list[Problem], root: Path) -> list[str]:
    """Report lines with the dataset root replaced by ``~`` (stable across tmp paths)."""
    return [str(p).replace(str(root), "~") for p in problems]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "Dataset900_Tiny", cases=("case_a", "case_b"))


# ------------------------------------------------------------------------------------------
# discovery


def test_load_dataset_finds_cases_channels_in_order_and_test_cases(tmp_path: Path) -> None:
    channels = {str(c): f"ch{c}" for c in range(11)}  # _0010 must come after _0002
    root = make_dataset(
        tmp_path / "Dataset901_Order",
        cases=("b", "a"),
        test_cases=("t2", "t1"),
        test_labels=("t1",),
        channels=channels,
    )
    ds = load_dataset(root)
    assert ds.name == "Dataset901_Order"
    assert ds.channel_names == {c: f"ch{c}" for c in range(11)}
    assert ds.n_channels == 11
    assert ds.labels == {"background": 0, "lesion": 1}
    assert ds.label_values == (0, 1)
    assert ds.file_ending == ".nii.gz"
    assert ds.num_training == 2
    assert [c.case_id for c in ds.training] == ["a", "b"]
    for case in ds.training:
        assert [p.name for p in case.images] == [
            f"{case.case_id}_{c:04d}.nii.gz" for c in range(11)
        ]
        assert case.label == root / "labelsTr" / f"{case.case_id}.nii.gz"
    assert [c.case_id for c in ds.test] == ["t1", "t2"]
    assert ds.test[0].label == root / "labelsTs" / "t1.nii.gz"
    assert ds.test[1].label is None
    assert verify_dataset(root) == []


def test_lesion_free_case_is_valid(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "Dataset902_Empty", cases=("a", "b"), lesion_free=("b",))
    assert read_image(root / "labelsTr" / "b.nii.gz").array.max() == 0
    assert [c.case_id for c in load_dataset(root).training] == ["a", "b"]
    assert verify_dataset(root) == []


def test_load_dataset_accepts_the_dataset_json_path_and_ignores_hidden_files(dataset: Path) -> None:
    (dataset / "imagesTr" / ".DS_Store").write_bytes(b"\0")
    (dataset / "imagesTr" / "notes.txt").write_text("stray, but not blocking")
    ds = load_dataset(dataset / "dataset.json")
    assert len(ds.training) == 2
    assert messages(verify_dataset(dataset), dataset) == [
        "~/imagesTr/notes.txt: stray file: name does not match {case}_{XXXX}.nii.gz"
    ]


def test_detached_header_dataset_ignores_its_data_files(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "Dataset903_Mhd", cases=("a.1", "b"), ending=".mhd")
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [
        "a.1.mhd",
        "a.1.raw",
        "b.mhd",
        "b.raw",
    ]
    assert [c.case_id for c in load_dataset(root).training] == ["a.1", "b"]
    assert verify_dataset(root) == []
    (root / "labelsTr" / "c.raw").write_bytes(b"")
    assert messages(verify_dataset(root), root) == [
        "~/labelsTr/c.raw: stray file: name does not match {case}.mhd"
    ]


def test_find_cases_on_a_prediction_folder(dataset: Path) -> None:
    cases = find_cases(dataset / "imagesTr", 2, ".nii.gz")
    assert [c.case_id for c in cases] == ["case_a", "case_b"]
    assert all(c.label is None and len(c.images) == 2 for c in cases)
    (dataset / "imagesTr" / "case_b_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case_b_0001\.nii\.gz: missing channel 1 of case case_b"):
        find_cases(dataset / "imagesTr", 2, ".nii.gz")
    with pytest.raises(InputError, match="folder not found"):
        find_cases(dataset / "nowhere", 2, ".nii.gz")


# ------------------------------------------------------------------------------------------
# load_dataset failures: one line, naming the file


def drop_json(root: Path) -> None:
    (root / "dataset.json").unlink()


def break_json_syntax(root: Path) -> None:
    (root / "dataset.json").write_text('{"labels": {"background": 0,}')


def drop_labels_key(root: Path) -> None:
    edit_json(root, labels=None)


def region_labels(root: Path) -> None:
    edit_json(root, labels={"background": 0, "whole": [1, 2]})


def gap_in_labels(root: Path) -> None:
    edit_json(root, labels={"background": 0, "lesion": 2})


def gap_in_channels(root: Path) -> None:
    edit_json(root, channel_names={"0": "FLAIR", "2": "T1"})


def unsupported_ending(root: Path) -> None:
    edit_json(root, file_ending=".png")


def wrong_num_training(root: Path) -> None:
    edit_json(root, numTraining=3)


def drop_two_channels(root: Path) -> None:
    (root / "imagesTr" / "case_a_0001.nii.gz").unlink()
    (root / "imagesTr" / "case_b_0000.nii.gz").unlink()


def drop_label(root: Path) -> None:
    (root / "labelsTr" / "case_b.nii.gz").unlink()


def orphan_label(root: Path) -> None:
    for c in range(2):
        (root / "imagesTr" / f"case_b_{c:04d}.nii.gz").unlink()
    edit_json(root, numTraining=1)


def extra_channel(root: Path) -> None:
    (root / "imagesTr" / "case_a_0002.nii.gz").write_bytes(b"")


def no_channel_suffix(root: Path) -> None:
    (root / "imagesTr" / "case_c.nii.gz").write_bytes(b"")


def drop_labels_folder(root: Path) -> None:
    for path in (root / "labelsTr").iterdir():
        path.unlink()
    (root / "labelsTr").rmdir()


@pytest.mark.parametrize(
    ("breaker", "pattern"),
    [
        (drop_json, r"dataset\.json: file not found$"),
        (break_json_syntax, r"dataset\.json: invalid JSON: Expecting .*line 1"),
        (drop_labels_key, r"dataset\.json: missing key 'labels'$"),
        (region_labels, r"dataset\.json: invalid 'labels': region-based labels are not supported"),
        (gap_in_labels, r"invalid 'labels': values must be consecutive .*got 0, 2"),
        (gap_in_channels, r"invalid 'channel_names': channel indices must be 0\.\.1, got 0, 2"),
        (unsupported_ending, r"invalid 'file_ending': expected one of \.nii\.gz.*got '\.png'"),
        (wrong_num_training, r"numTraining mismatch: dataset\.json says 3, imagesTr has 2 cases"),
        (
            drop_two_channels,
            r"imagesTr/case_a_0001\.nii\.gz: missing channel 1 \(T1\) of case case_a",
        ),
        (drop_label, r"labelsTr/case_b\.nii\.gz: missing label of case case_b$"),
        (orphan_label, r"labelsTr/case_b\.nii\.gz: label without images"),
        (extra_channel, r"case_a_0002\.nii\.gz: undeclared channel 2: .*has 2 \(0-1\)"),
        (no_channel_suffix, r"case_c\.nii\.gz: stray file: name does not match \{case\}_\{XXXX\}"),
        (drop_labels_folder, r"labelsTr: folder not found"),
    ],
)
def test_load_dataset_rejects_a_broken_dataset_in_one_line(
    dataset: Path, breaker: Callable[[Path], None], pattern: str
) -> None:
    breaker(dataset)
    with pytest.raises(InputError, match=pattern) as info:
        load_dataset(dataset)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(dataset))
    # verify reports the same problem instead of raising
    assert any(re.search(pattern, str(p)) for p in verify_dataset(dataset))


def test_load_dataset_error_counts_the_other_problems(dataset: Path) -> None:
    drop_two_channels(dataset)
    drop_label(dataset)
    with pytest.raises(
        InputError,
        match=r"case_a_0001\.nii\.gz: missing channel 1 \(T1\) of case "
        r"case_a \(and 2 more problems: run `segmenter verify .*Dataset900_Tiny`\)$",
    ):
        load_dataset(dataset)


def test_load_dataset_on_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Dataset999_None: dataset folder not found"):
        load_dataset(tmp_path / "Dataset999_None")
    assert messages(verify_dataset(tmp_path / "Dataset999_None"), tmp_path) == [
        "~/Dataset999_None: dataset folder not found"
    ]


# ------------------------------------------------------------------------------------------
# verify: each problem found, exactly once, as one greppable line


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


def as_4d(array: np.ndarray, affine: np.ndarray) -> tuple:
    return np.stack([array, array], axis=-1), affine


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
        (IMG, as_4d, "4D image: shape 8x9x10x2, expected 3D"),
        (IMG, truncate, "unreadable: cannot read image ("),
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
    assert found[1].startswith(f"~/imagesTr/{second}_0003.nii.gz: unreadable: cannot read image (")
