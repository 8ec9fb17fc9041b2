"""Tests for segmenter.data.layout: discovery of the nnU-Net raw layout and its one-line errors.

Each ``load_dataset`` failure is checked against ``verify_dataset`` too, which must report the
same problem instead of raising; verify's own checks are in ``test_verify.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_dataset import edit_json, make_dataset, messages

from segmenter.data.layout import find_cases, load_dataset
from segmenter.data.verify import verify_dataset
from segmenter.errors import InputError
from segmenter.io import read_image

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
