"""Tests for segmenter.preprocessing.case: one case read and checked, cropped, resampled and
reoriented, and put back on its own grid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmenter.data import layout as data
from segmenter.errors import InputError
from segmenter.io import read_image, write_image
from segmenter.preprocessing.case import (
    preprocess_arrays,
    preprocess_case,
    read_case,
    resample_hook,
)
from segmenter.preprocessing.geometry import CropBox
from segmenter.preprocessing.spec import PreprocessingSpec


def copy_case(phantoms: Path, tmp_path: Path) -> data.Case:
    """Case 0 of the shared phantoms copied into ``tmp_path`` (so a test can damage its files)."""
    case = data.load_dataset(phantoms).training[0]
    images = []
    for path in case.images:
        img = read_image(path)
        images.append(write_image(tmp_path / path.name, img.array, img.affine))
    lab = read_image(case.label)
    label = write_image(tmp_path / case.label.name, lab.array, lab.affine)
    return data.Case(case.case_id, tuple(images), label)


def test_preprocess_case_on_phantom(phantoms: Path, tmp_path: Path) -> None:
    case = copy_case(phantoms, tmp_path)
    for path in case.images:  # air outside the head: zero a border of a few voxels
        img = read_image(path)
        array = np.zeros_like(img.array)
        array[2:-3, 1:, :-4] = img.array[2:-3, 1:, :-4]
        write_image(path, array, img.affine)
    pre = preprocess_case(case)
    assert pre.box == CropBox((2, 1, 0), (29, 32, 28), (32, 32, 32))
    original = read_image(case.label).array
    assert pre.case_id == case.case_id
    assert pre.image.dtype == np.float32 and pre.image.shape == (2, *pre.box.size)
    assert pre.label is not None and pre.label.dtype == np.uint8
    assert pre.label.shape == pre.box.size
    assert pre.original_shape == original.shape == (32, 32, 32)
    np.testing.assert_array_equal(pre.restore(pre.label), original)
    np.testing.assert_allclose(pre.affine, read_image(case.images[0]).affine)
    assert pre.spacing == (1.0, 1.0, 1.0)
    restored = pre.restore(pre.image)
    assert restored.shape == (2, 32, 32, 32)
    inside = np.zeros(restored.shape[1:], dtype=bool)
    inside[pre.box.slices] = True
    assert not restored[:, ~inside].any()


def test_preprocess_case_without_crop(phantoms: Path) -> None:
    case = data.load_dataset(phantoms).training[1]
    pre = preprocess_case(case, PreprocessingSpec(crop_to_nonzero=False))
    assert pre.box == CropBox.whole((32, 32, 32))
    assert pre.image.shape == (2, 32, 32, 32)


def test_read_case_returns_images_and_checked_label(phantoms: Path) -> None:
    case = data.load_dataset(phantoms).training[0]
    images, label = read_case(case)
    assert len(images) == 2 and images[0].array.dtype == np.float32
    assert label is not None and label.dtype == np.uint8 and label.shape == (32, 32, 32)
    images, label = read_case(case, with_label=False)
    assert label is None and images[1].path == case.images[1]


def test_channel_shape_mismatch_names_the_file(phantoms: Path, tmp_path: Path) -> None:
    case = copy_case(phantoms, tmp_path)
    write_image(case.images[1], np.ones((32, 32, 30), dtype=np.float32), np.eye(4))
    with pytest.raises(InputError, match=rf"{case.images[1].name}: shape 32x32x30 differs"):
        preprocess_case(case)


def test_label_shape_mismatch_names_the_file(phantoms: Path, tmp_path: Path) -> None:
    case = copy_case(phantoms, tmp_path)
    write_image(case.label, np.zeros((31, 32, 32), dtype=np.uint8), np.eye(4))
    with pytest.raises(InputError, match=rf"{case.label.name}: label shape 31x32x32"):
        preprocess_case(case)


def test_nan_voxels_name_the_file(phantoms: Path, tmp_path: Path) -> None:
    case = copy_case(phantoms, tmp_path)
    img = read_image(case.images[0], dtype=np.float32)
    array = img.array.copy()
    array[3, 4, 5] = np.nan
    write_image(case.images[0], array, img.affine)
    with pytest.raises(InputError, match=rf"{case.images[0].name}: non-finite voxels \(1 NaN"):
        preprocess_case(case)


def test_preprocess_arrays_checks_label() -> None:
    images = [np.ones((4, 4, 4), dtype=np.float32)]
    with pytest.raises(InputError, match="c1 label: non-integer"):
        preprocess_arrays(
            images, np.full((4, 4, 4), 0.5), np.eye(4), (1, 1, 1), case_id="c1"
        )  # fmt: skip
    with pytest.raises(InputError, match="c1: channel 1 shape"):
        preprocess_arrays(
            images + [np.ones((4, 4, 5))], None, np.eye(4), (1, 1, 1), case_id="c1"
        )  # fmt: skip


def test_resample_hook_keeps_own_spacing_and_resamples_to_another() -> None:
    image = np.ones((1, 4, 4, 4), dtype=np.float32)
    assert resample_hook(image, None, (1.0, 1.0, 2.0), None)[0] is image
    assert resample_hook(image, None, (1.0, 1.0, 2.0), (1.0, 1.0, 2.0))[2] == (1.0, 1.0, 2.0)
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    out, lab, spacing = resample_hook(image, label, (1.0, 1.0, 2.0), (1.0, 1.0, 1.0))
    assert out.shape == (1, 4, 4, 8) and lab is not None and lab.shape == (4, 4, 8)
    assert spacing == (1.0, 1.0, 1.0) and lab.sum() == 2 * label.sum()


def test_resampled_case_restores_probabilities_to_the_original_grid() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((30, 28, 12), np.float32)
    image[4:26, 3:25, 1:11] = rng.random((22, 22, 10)) + 1.0
    label = np.zeros(image.shape, np.uint8)
    label[10:14, 10:14, 4:7] = 1
    pre = preprocess_arrays(
        [image], label, np.diag([0.9, 0.9, 3.0, 1.0]), (0.9, 0.9, 3.0), case_id="c",
        spec=PreprocessingSpec(target_spacing=(1.0, 1.0, 1.0)),
    )  # fmt: skip
    assert pre.spacing == (1.0, 1.0, 1.0)
    assert pre.image.shape == (1, 20, 20, 30) and pre.label is not None
    assert pre.label.shape == (20, 20, 30)
    prob = pre.restore(pre.label.astype(np.float32))  # the label as a probability map
    assert prob.shape == image.shape and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    back = prob > 0.5
    dice = 2 * (back & (label > 0)).sum() / (back.sum() + (label > 0).sum())
    assert dice > 0.8  # the lesion lands back where it was


def test_crop_affine_maps_cropped_voxels_to_the_same_world_points() -> None:
    affine = np.array([[0.0, -2.0, 0, 10], [1.5, 0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    img = np.zeros((10, 12, 8), np.float32)
    img[3:7, 2:9, 1:5] = 5.0
    case = preprocess_arrays([img], None, affine, (1.5, 2.0, 3.0), case_id="c")
    # canonical order: axis 0 = original axis 1 flipped (-2 mm along x: L -> R), axis 1 =
    # original axis 0 (A), axis 2 unchanged (S)
    assert case.box.lo == (3, 3, 1) and case.spacing == (2.0, 1.5, 3.0)
    world_cropped = case.crop_affine @ np.array([0.0, 0.0, 0.0, 1.0])
    world_original = affine @ np.array([3.0, 12 - 1 - 3, 1.0, 1.0])
    np.testing.assert_allclose(world_cropped, world_original)


@pytest.mark.parametrize(
    "codes", [("L", "P", "S"), ("P", "I", "R"), ("A", "S", "L"), ("R", "A", "S")]
)
def test_cases_are_reoriented_to_ras_and_restored(
    codes: tuple[str, str, str], axcode_affine: Callable[..., np.ndarray]
) -> None:
    spacing = (0.9, 1.1, 2.5)
    affine = axcode_affine(codes, spacing)
    assert nib.aff2axcodes(affine) == codes
    rng = np.random.default_rng(0)
    img = np.zeros((9, 11, 7), np.float32)
    img[1:8, 2:10, 1:6] = rng.random((7, 8, 5)) + 1
    label = ((rng.random((9, 11, 7)) > 0.7) & (img > 0)).astype(np.uint8)
    pre = preprocess_arrays([img], label, affine, spacing, case_id="c")
    assert nib.aff2axcodes(pre.affine) == ("R", "A", "S")
    assert sorted(pre.spacing) == sorted(spacing) and pre.label is not None
    np.testing.assert_array_equal(pre.restore(pre.label), label)
    # every voxel of the crop sits at the world position of the original voxel it came from
    for idx in [(0, 0, 0), tuple(n - 1 for n in pre.label.shape), (2, 3, 1)]:
        world = pre.crop_affine @ np.array([*idx, 1.0])
        ijk = np.linalg.solve(affine, world)[:3]
        np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-9)
        assert pre.label[idx] == label[tuple(np.round(ijk).astype(int))]
