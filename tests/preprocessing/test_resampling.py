"""Tests for segmenter.preprocessing.resampling: target spacing rule, grids, images, labels,
probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from segmenter.preprocessing.resampling import (
    new_shape,
    resample_image,
    resample_label,
    resample_probabilities,
    target_spacing,
)


def test_target_spacing_is_the_median_for_isotropic_data() -> None:
    spacings = [(1.0, 1.0, 1.0), (0.9, 1.0, 1.2), (1.1, 1.0, 1.0)]
    shapes = [(100, 100, 100)] * 3
    assert target_spacing(spacings, shapes) == pytest.approx((1.0, 1.0, 1.0))


def test_anisotropic_axis_takes_the_10th_percentile() -> None:
    # thick slices of 5 mm in most cases, 3 mm in a few: median 5, 10th percentile 3
    spacings = [(0.8, 0.8, 5.0)] * 8 + [(0.8, 0.8, 3.0)] * 2
    shapes = [(256, 256, 30)] * 10
    assert target_spacing(spacings, shapes) == pytest.approx((0.8, 0.8, 3.0))
    # anisotropic spacing but many slices: the median stays (nnU-Net needs both conditions)
    assert target_spacing(spacings, [(64, 64, 200)] * 10)[2] == pytest.approx(5.0)


def test_new_shape_rounds_and_keeps_one_voxel() -> None:
    assert new_shape((100, 50, 3), (1.0, 1.0, 1.0), (1.5, 0.5, 10.0)) == (67, 100, 1)
    with pytest.raises(ValueError, match="new_spacing"):
        new_shape((10, 10, 10), (1, 1, 1), (1, 0, 1))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 4.0)])
def test_images_keep_constants_and_ramps(spacing: tuple[float, float, float]) -> None:
    x = np.arange(30, dtype=np.float32)
    ramp = np.broadcast_to(x[:, None, None], (30, 24, 12))
    image = np.stack([np.full((30, 24, 12), 7.0, np.float32), ramp])
    out = resample_image(image, spacing, (1.5, 0.75, 2.0))
    assert out.shape == (2, 20, 32, round(12 * spacing[2] / 2.0)) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 7.0, atol=1e-4)
    # the ramp is linear in physical space: new centres at (i + 0.5) * 1.5 - 0.5 old voxels
    expected = (np.arange(20) + 0.5) * 1.5 - 0.5
    np.testing.assert_allclose(out[1, 2:-2, 5, 0], expected[2:-2], atol=5e-3)  # edge: spline


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_a_radius_one_lesion_survives_1mm_to_1p5mm_and_back(offset: int) -> None:
    label = np.zeros((30, 30, 30), np.uint8)
    c = 12 + offset  # each offset puts the lesion at another phase of the 1.5 mm grid
    ball = ndi.generate_binary_structure(3, 1)  # radius 1: centre and its 6 neighbours
    label[c - 1 : c + 2, c - 1 : c + 2, c - 1 : c + 2] = ball
    down = resample_label(label, (1.0, 1.0, 1.0), (1.5, 1.5, 1.5))
    back = resample_label(down, (1.5, 1.5, 1.5), (1.0, 1.0, 1.0), shape=label.shape)
    assert down.any() and back.shape == label.shape
    assert back[c - 2 : c + 3, c - 2 : c + 3, c - 2 : c + 3].any()  # still there, same place
    assert back.sum() <= 27


def test_without_the_rescue_a_small_lesion_can_vanish() -> None:
    # the phase where the 0.5 threshold alone loses it (why keep_small exists)
    label = np.zeros((30, 30, 30), np.uint8)
    label[11:14, 11:14, 11:14] = ndi.generate_binary_structure(3, 1)
    plain = [
        resample_label(np.roll(label, s, axis=(0, 1, 2)), (1, 1, 1), (1.5, 1.5, 1.5),
                       keep_small=False).any()
        for s in range(3)
    ]  # fmt: skip
    assert not all(plain)
    nearest = [
        ndi.zoom(np.roll(label, s, axis=(0, 1, 2)), 1 / 1.5, order=0).any() for s in range(3)
    ]
    assert not all(nearest)  # nearest neighbour deletes it at some phase too


def test_labels_keep_their_values_and_large_lesions_their_volume() -> None:
    zz, yy, xx = np.mgrid[:40, :40, :40]
    label = np.zeros((40, 40, 40), np.uint8)
    label[(xx - 20) ** 2 + (yy - 20) ** 2 + (zz - 20) ** 2 <= 10**2] = 1
    label[3:6, 3:6, 3:6] = 2
    out = resample_label(label, (1.0, 1.0, 1.0), (0.8, 1.25, 2.0))
    assert set(np.unique(out)) == {0, 1, 2} and out.dtype == np.uint8
    vol_in = (label == 1).sum()
    vol_out = (out == 1).sum() * 0.8 * 1.25 * 2.0
    assert vol_out == pytest.approx(vol_in, rel=0.05)


def test_probabilities_stay_in_range() -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((10, 12, 4)).astype(np.float32)
    out = resample_probabilities(prob, (1.0, 1.0, 4.0), (20, 24, 16))
    assert out.shape == (20, 24, 16) and 0.0 <= out.min() and out.max() <= 1.0
    two = resample_probabilities(np.stack([prob, 1 - prob]), (1.0, 1.0, 4.0), (20, 24, 16))
    assert two.shape == (2, 20, 24, 16)
