"""Tests for segmenter.preprocessing.geometry: crop boxes, the nonzero box, crop and uncrop,
reorientation to RAS."""

from __future__ import annotations

from collections.abc import Callable

import nibabel as nib
import numpy as np
import pytest

from segmenter.preprocessing.geometry import CropBox, crop, nonzero_bbox, to_canonical, uncrop


def block_images() -> np.ndarray:
    """(2, 10, 12, 14): channel 0 nonzero in one block, channel 1 in another."""
    images = np.zeros((2, 10, 12, 14), dtype=np.float32)
    images[0, 2:5, 3:7, 4:6] = np.arange(3 * 4 * 2).reshape(3, 4, 2) + 1.0
    images[1, 4:8, 5:6, 1:3] = 7.0
    return images


def test_nonzero_bbox_is_union_of_channels() -> None:
    box = nonzero_bbox(block_images())
    assert box == CropBox((2, 3, 1), (8, 7, 6), (10, 12, 14))
    assert box.size == (6, 4, 5)


def test_nonzero_bbox_of_empty_volume_is_whole() -> None:
    box = nonzero_bbox(np.zeros((1, 4, 5, 6)))
    assert box == CropBox.whole((4, 5, 6))


def test_crop_uncrop_round_trip() -> None:
    images = block_images()
    box = nonzero_bbox(images)
    cropped = crop(images, box)
    assert cropped.shape == (2, *box.size)
    np.testing.assert_array_equal(uncrop(cropped, box), images)
    label = (images[0] > 3).astype(np.uint8)
    np.testing.assert_array_equal(uncrop(crop(label, box), box), label)
    assert uncrop(crop(label, box), box, fill=9)[0, 0, 0] == 9


def test_cropbox_rejects_box_outside_volume() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        CropBox((0, 0, 0), (5, 5, 9), (5, 5, 8))


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "I", "R"), ("A", "S", "L")])
def test_to_canonical_reorders_to_ras_and_keeps_every_voxel_in_place(
    codes: tuple[str, str, str], axcode_affine: Callable[..., np.ndarray]
) -> None:
    spacing = (0.9, 1.1, 2.5)
    affine = axcode_affine(codes, spacing)
    rng = np.random.default_rng(0)
    images = rng.random((2, 4, 5, 6)).astype(np.float32)
    label = (images[0] > 0.5).astype(np.uint8)
    out, lab, new_affine, new_spacing, orientation = to_canonical(images, label, affine, spacing)
    assert nib.aff2axcodes(new_affine) == ("R", "A", "S") and orientation is not None
    assert out.shape[0] == 2 and lab is not None and lab.shape == out.shape[1:]
    assert out.flags.c_contiguous and lab.flags.c_contiguous
    assert sorted(out.shape[1:]) == [4, 5, 6] and sorted(new_spacing) == sorted(spacing)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), new_spacing)
    # each voxel of the result holds the original voxel at the same world position
    for idx in np.ndindex(*out.shape[1:]):
        ijk = np.linalg.solve(affine, new_affine @ np.array([*idx, 1.0]))[:3]
        original = tuple(np.round(ijk).astype(int))
        np.testing.assert_allclose(ijk, original, atol=1e-9)
        assert out[(slice(None), *idx)].tolist() == images[(slice(None), *original)].tolist()
        assert lab[idx] == label[original]


def test_to_canonical_leaves_a_ras_case_alone(axcode_affine: Callable[..., np.ndarray]) -> None:
    images = np.zeros((1, 3, 4, 5), np.float32)
    affine = axcode_affine(("R", "A", "S"), (1.0, 2.0, 3.0))
    out, lab, new_affine, spacing, orientation = to_canonical(images, None, affine, (1.0, 2.0, 3.0))
    assert out is images and lab is None and new_affine is affine and orientation is None
    assert spacing == (1.0, 2.0, 3.0)
