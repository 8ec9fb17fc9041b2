"""Tests for segmenter.preprocessing.normalisation: z-score inside the nonzero mask, clipping,
CT channels with dataset statistics."""

from __future__ import annotations

import numpy as np
import pytest

from segmenter.config import ChannelNormalization
from segmenter.errors import InputError
from segmenter.preprocessing.normalisation import nonzero_mask, normalise


def test_nonzero_mask_is_the_union_of_channels_with_holes_filled() -> None:
    images = np.zeros((2, 7, 7, 7), np.float32)
    images[0, 1:6, 1:6, 1:6] = 1.0
    images[0, 3, 3, 3] = 0.0  # a hole inside channel 0: filled
    images[1, 0, 0, 0] = -2.0  # negative counts as nonzero; only channel 1 has it
    mask = nonzero_mask(images)
    assert mask.dtype == bool and mask.shape == (7, 7, 7)
    expected = np.zeros((7, 7, 7), bool)
    expected[1:6, 1:6, 1:6] = True
    expected[0, 0, 0] = True
    np.testing.assert_array_equal(mask, expected)


def test_zscore_inside_mask() -> None:
    rng = np.random.default_rng(0)
    images = np.zeros((2, 12, 12, 12), dtype=np.float32)
    images[:, 3:9, 2:10, 4:8] = rng.normal(50.0, 7.0, size=(2, 6, 8, 4))
    images[1, 10, 10, 10] = 3.0  # only channel 1: still inside the union mask
    out, stats = normalise(images)
    mask = (images != 0).any(axis=0)
    assert out.dtype == np.float32
    assert stats.mask_voxels == int(mask.sum())
    for c in range(2):
        inside = out[c][mask].astype(np.float64)
        assert abs(inside.mean()) < 1e-5
        assert abs(inside.std() - 1.0) < 1e-5
        assert stats.mean[c] == pytest.approx(images[c][mask].mean(dtype=np.float64), rel=1e-6)
    assert not out[:, ~mask].any()


def test_zscore_constant_channel_and_empty_case() -> None:
    images = np.zeros((2, 6, 6, 6), dtype=np.float32)
    images[:, 1:4, 1:4, 1:4] = 5.0
    out, stats = normalise(images)
    assert np.isfinite(out).all() and not out.any()
    assert stats.std == (1.0, 1.0)
    out, stats = normalise(np.zeros((1, 4, 4, 4), dtype=np.float32))
    assert np.isfinite(out).all() and stats.mask_voxels == 64


def test_zscore_fills_holes_of_the_mask() -> None:
    images = np.zeros((1, 9, 9, 9), dtype=np.float32)
    images[0, 2:7, 2:7, 2:7] = 4.0
    images[0, 4, 4, 4] = 0.0  # a hole: inside the mask, normalised like its neighbours
    images[0, 2, 2, 2] = 30.0
    out, stats = normalise(images)
    assert stats.mask_voxels == 125
    assert out[0, 4, 4, 4] < out[0, 3, 3, 3] < 0 < out[0, 2, 2, 2]


def test_clipping_keeps_intensity_spikes_from_dominating_the_z_score() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(500.0, 100.0, (1, 30, 30, 30)).astype(np.float32)
    image[0, 5, 5, 5] = 32767.0  # a saturated voxel, as in BraTS
    image[0, 6, 5, 5] = 32767.0
    plain, stats = normalise(image)
    clipped, clipped_stats = normalise(image, (0.5, 99.5))
    assert plain[0, 5, 5, 5] > 100  # hundreds of standard deviations out
    assert clipped[0, 5, 5, 5] < 4 and clipped.max() < 4
    assert stats.std[0] > 200  # two voxels out of 27000 triple the standard deviation
    assert 90 < clipped_stats.std[0] < 110
    inside = clipped[0, 10:20, 10:20, 10:20]
    assert abs(float(inside.mean())) < 0.1 and abs(float(inside.std()) - 1.0) < 0.1


def test_ct_channels_use_the_dataset_statistics_over_the_whole_volume() -> None:
    rng = np.random.default_rng(1)
    images = np.zeros((2, 10, 10, 10), dtype=np.float32)
    images[0] = -1000.0  # air in Hounsfield units
    images[0, 2:8, 2:8, 2:8] = rng.normal(40.0, 20.0, (6, 6, 6))
    images[0, 5, 5, 5] = 3000.0  # metal: clipped
    images[1, 2:8, 2:8, 2:8] = rng.normal(300.0, 30.0, (6, 6, 6))
    ct = ChannelNormalization(scheme="ct_clip_zscore", clip=(-900.0, 1500.0), mean=50.0, std=250.0)
    out, stats = normalise(images, (0.5, 99.5), (ct, ChannelNormalization()))
    expected = (np.clip(images[0], -900.0, 1500.0) - 50.0) / 250.0
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    assert out[0, 0, 0, 0] == pytest.approx(-3.8)  # air is not zeroed: the same value in any scan
    assert stats.mean[0] == 50.0 and stats.std[0] == 250.0
    mri, _ = normalise(images[1:], (0.5, 99.5))
    np.testing.assert_array_equal(out[1], mri[0])  # the MRI channel is z-scored as before
    with pytest.raises(InputError, match="2 channel"):
        normalise(images, None, (ct,))
