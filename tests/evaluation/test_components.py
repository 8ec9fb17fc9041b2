"""Tests for segmenter.evaluation.components: labelling, component sizes, bounding boxes."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from mask_builders import voxels
from scipy import ndimage

from segmenter.evaluation.components import bounding_box, component_sizes, label_components


@pytest.mark.parametrize(("connectivity", "corner", "edge"), [(6, 2, 2), (18, 2, 1), (26, 1, 1)])
def test_connectivity_decides_what_touches(connectivity: int, corner: int, edge: int) -> None:
    at_corner = voxels((4, 4, 4), (1, 1, 1), (2, 2, 2))
    at_edge = voxels((4, 4, 4), (1, 1, 1), (2, 2, 1))
    assert label_components(at_corner, connectivity)[1] == corner
    assert label_components(at_edge, connectivity)[1] == edge


def test_labels_follow_the_raster_order_of_the_memory_layout() -> None:
    mask = voxels((5, 5, 5), (4, 0, 0), (0, 4, 4), (0, 0, 2))
    labels, n = label_components(mask)
    assert n == 3
    assert (labels[0, 0, 2], labels[0, 4, 4], labels[4, 0, 0]) == (1, 2, 3)
    labels, _ = label_components(np.asfortranarray(mask))
    assert (labels[4, 0, 0], labels[0, 0, 2], labels[0, 4, 4]) == (1, 2, 3)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_same_labels_as_cc3d(connectivity: int) -> None:
    rng = np.random.default_rng(connectivity)
    mask = ndimage.gaussian_filter(rng.random((20, 17, 13)), 1.0) > 0.55
    for variant in (mask, np.asfortranarray(mask), mask.astype(np.uint8)):
        expected = cc3d.connected_components(variant, connectivity=connectivity)
        labels, n = label_components(variant, connectivity)
        np.testing.assert_array_equal(labels, expected)
        assert labels.dtype == expected.dtype and n == int(expected.max())


def test_empty_masks_give_uint16_zeros() -> None:
    for shape in ((3, 4, 5), (0, 4, 5)):
        labels, n = label_components(np.zeros(shape, dtype=bool))
        assert n == 0 and labels.shape == shape and labels.dtype == np.uint16
        assert not labels.any()


def test_unsupported_connectivity_raises() -> None:
    with pytest.raises(ValueError, match="connectivity must be 6, 18 or 26, got 8"):
        label_components(voxels((3, 3, 3), (1, 1, 1)), connectivity=8)


def test_component_sizes_of_a_volume_and_of_selected_voxels() -> None:
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[4, 4, 4] = True
    labels, n = label_components(mask)
    np.testing.assert_array_equal(component_sizes(labels, n), [8, 1])
    np.testing.assert_array_equal(component_sizes(np.asfortranarray(labels), n), [8, 1])
    assert component_sizes(labels[mask], n).dtype == np.int64
    np.testing.assert_array_equal(component_sizes(np.zeros(0, np.uint16), 2), [0, 0])


def test_bounding_box_holds_every_voxel() -> None:
    mask = voxels((6, 7, 8), (1, 5, 2), (3, 2, 6))
    assert bounding_box(mask) == (slice(1, 4), slice(2, 6), slice(2, 7))
    assert bounding_box(mask.astype(np.float32)) == bounding_box(mask)
    assert bounding_box(np.asfortranarray(mask)) == bounding_box(mask)
    box = bounding_box(mask)
    assert box is not None and mask[box].sum() == mask.sum()
    assert all(type(s.start) is int and type(s.stop) is int for s in box)


def test_bounding_box_margin_is_clipped_to_the_array() -> None:
    mask = voxels((6, 7, 8), (1, 5, 2), (3, 2, 6))
    assert bounding_box(mask, margin=2) == (slice(0, 6), slice(0, 7), slice(0, 8))
    assert bounding_box(voxels((9, 9, 9), (4, 4, 4)), 1) == (slice(3, 6),) * 3


def test_bounding_box_of_an_empty_mask_is_none() -> None:
    assert bounding_box(np.zeros((3, 4, 5), dtype=bool)) is None
    assert bounding_box(np.zeros((0, 4, 5), dtype=bool), margin=1) is None


def test_bounding_box_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"3D \(X, Y, Z\) array, got shape \(3, 4\)"):
        bounding_box(np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="margin must be >= 0, got -1"):
        bounding_box(np.ones((3, 4, 5), dtype=bool), margin=-1)
