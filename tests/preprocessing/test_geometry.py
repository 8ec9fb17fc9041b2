"""Tests for segmenter.preprocessing.geometry: crop boxes, the nonzero box, crop and uncrop,
reorientation to RAS."""

from __future__ import annotations

import numpy as np
import pytest

from segmenter.preprocessing.geometry import CropBox, crop, nonzero_bbox, uncrop


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
