from __future__ import annotations

import numpy as np
import pytest

from segmenter.evaluation.postprocess import binarize, probabilities_to_mask, remove_small_lesions


def test_binarize_threshold_is_inclusive() -> None:
    p = np.array([0.2, 0.5, 0.7], np.float32).reshape(1, 1, 3)
    np.testing.assert_array_equal(binarize(p, 0.5).ravel(), [0, 1, 1])
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        binarize(p, 1.0)


def test_small_lesions_removed_by_volume_in_mm3() -> None:
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[6, 6, 6] = 1  # 1 voxel
    # voxel 2 mm3: the single voxel is 2 mm3, the cube 16 mm3
    out = remove_small_lesions(mask, (1.0, 1.0, 2.0), 3.0)
    assert out.sum() == 8 and out[6, 6, 6] == 0
    assert remove_small_lesions(mask, (1.0, 1.0, 2.0), 0.0).sum() == 9
    assert remove_small_lesions(mask, (1.0, 1.0, 2.0), 16.0).sum() == 8  # >= keeps equal
    assert remove_small_lesions(mask, (1.0, 1.0, 2.0), 16.1).sum() == 0


def test_connectivity_decides_what_one_lesion_is() -> None:
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # diagonal neighbours
    assert remove_small_lesions(mask, (1, 1, 1), 2.0, connectivity=26).sum() == 2
    assert remove_small_lesions(mask, (1, 1, 1), 2.0, connectivity=6).sum() == 0


def test_probabilities_to_mask() -> None:
    p = np.zeros((6, 6, 6), np.float32)
    p[1:3, 1:3, 1:3] = 0.9
    p[5, 5, 5] = 0.6
    out = probabilities_to_mask(p, (1, 1, 1), threshold=0.5, min_lesion_mm3=2)
    assert out.dtype == np.uint8 and out.sum() == 8
