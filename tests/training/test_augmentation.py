from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from segmenter.config import AugmentConfig
from segmenter.training.augmentation import (
    SpatialParams,
    apply_intensity,
    apply_spatial,
    augment,
    sample_spatial,
    source_shape,
    thick_axis,
)

NOTHING = AugmentConfig(
    flip_prob=0.0,
    rotate_scale_prob=0.0,
    brightness_prob=0.0,
    contrast_prob=0.0,
    gamma_prob=0.0,
    noise_prob=0.0,
)
EVERYTHING = AugmentConfig(
    flip_prob=0.5,
    rotate_scale_prob=1.0,
    brightness_prob=1.0,
    contrast_prob=1.0,
    gamma_prob=1.0,
    noise_prob=1.0,
)


def patch(shape: tuple[int, int, int] = (16, 18, 20), seed: int = 0):
    """A random 2-channel image and a label with a box lesion, as tensors."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(size=(2, *shape)).astype(np.float32))
    label = torch.zeros((1, *shape), dtype=torch.float32)
    label[0, 4:9, 5:10, 6:12] = 1.0
    return image, label


def ball_label(shape: tuple[int, int, int], centre: tuple[int, int, int]) -> torch.Tensor:
    """(1, *shape) label holding a radius-1 ball (the 7-voxel cross) at ``centre``."""
    label = torch.zeros((1, *shape))
    x, y, z = centre
    label[0, x - 1 : x + 2, y, z] = 1
    label[0, x, y - 1 : y + 2, z] = 1
    label[0, x, y, z - 1 : z + 2] = 1
    return label


def test_augment_keeps_shapes_and_binary_label() -> None:
    image, label = patch()
    for seed in range(5):
        out_img, out_lab = augment(image, label, EVERYTHING, np.random.default_rng(seed))
        assert out_img.shape == image.shape and out_img.dtype == torch.float32
        assert out_lab.shape == label.shape and out_lab.dtype == torch.float32
        assert set(out_lab.unique().tolist()) <= {0.0, 1.0}
        assert torch.isfinite(out_img).all()


def test_augment_does_not_modify_its_inputs() -> None:
    image, label = patch()
    before = image.clone(), label.clone()
    augment(image, label, EVERYTHING, np.random.default_rng(0))
    assert torch.equal(image, before[0]) and torch.equal(label, before[1])


def test_augment_is_deterministic_per_generator() -> None:
    image, label = patch()
    a = augment(image, label, EVERYTHING, np.random.default_rng(3))
    b = augment(image, label, EVERYTHING, np.random.default_rng(3))
    c = augment(image, label, EVERYTHING, np.random.default_rng(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_disabled_or_zero_probabilities_are_identity() -> None:
    image, label = patch()
    for cfg in (NOTHING, AugmentConfig(enabled=False)):
        out_img, out_lab = augment(image, label, cfg, np.random.default_rng(0))
        assert torch.equal(out_img, image) and torch.equal(out_lab, label)


def test_flip_is_exact() -> None:
    image, label = patch()
    cfg = replace(NOTHING, flip_prob=1.0)
    out_img, out_lab = augment(image, label, cfg, np.random.default_rng(0))
    assert torch.equal(out_img, torch.flip(image, (1, 2, 3)))
    assert torch.equal(out_lab, torch.flip(label, (1, 2, 3)))


def test_rotation_zero_scale_one_is_identity() -> None:
    image, label = patch()
    cfg = replace(NOTHING, rotate_scale_prob=1.0, rotation_deg=0.0, scale_range=(1.0, 1.0))
    params = sample_spatial(cfg, np.random.default_rng(0))
    assert params.matrix is not None
    out_img, out_lab = augment(image, label, cfg, np.random.default_rng(0))
    torch.testing.assert_close(out_img, image, atol=1e-5, rtol=0)
    assert torch.equal(out_lab, label)


def test_rotation_by_90_degrees_matches_rot90() -> None:
    image, label = patch((11, 11, 11))
    matrix = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out_img, out_lab = apply_spatial(image, label, SpatialParams(matrix, (False,) * 3))
    # output offset (a, b, c) reads source offset (-b, a, c)
    expected = torch.flip(image, (1,)).transpose(1, 2)
    torch.testing.assert_close(out_img, expected, atol=1e-5, rtol=0)
    assert torch.equal(out_lab, torch.flip(label, (1,)).transpose(1, 2))


def test_small_lesion_survives_rotation_and_scaling() -> None:
    shape = (24, 24, 24)
    image = torch.zeros((1, *shape))
    cfg = replace(NOTHING, rotate_scale_prob=1.0)
    for seed in range(40):
        label = ball_label(shape, (9, 14, 12))
        _, out = augment(image, label, cfg, np.random.default_rng(seed))
        assert out.sum() >= 1, f"lesion lost with seed {seed}"


def test_source_region_leaves_no_empty_corners() -> None:
    size = (16, 12, 20)
    for seed in range(10):
        params = sample_spatial(EVERYTHING, np.random.default_rng(seed))
        src = source_shape(params, size)
        assert all(s >= p and (s - p) % 2 == 0 for s, p in zip(src, size, strict=True))
        image = torch.ones((1, *src))
        out, _ = apply_spatial(image, torch.zeros((1, *src)), params, size)
        assert out.shape == (1, *size)
        torch.testing.assert_close(out, torch.ones_like(out), atol=1e-5, rtol=0)


def test_source_shape_without_rotation_is_patch() -> None:
    assert source_shape(SpatialParams(None, (True, False, True)), (8, 9, 10)) == (8, 9, 10)


def test_centre_crop_of_larger_source_without_rotation() -> None:
    image, label = patch((12, 12, 12))
    out, lab = apply_spatial(image, label, SpatialParams(None, (False,) * 3), (8, 10, 12))
    assert torch.equal(out, image[:, 2:10, 1:11, :]) and lab.shape == (1, 8, 10, 12)


def test_contrast_preserves_range_and_gamma_retains_stats() -> None:
    image, _ = patch()
    contrast = replace(NOTHING, contrast_prob=1.0)
    out = apply_intensity(image, contrast, np.random.default_rng(0))
    assert out.min() >= image.min() and out.max() <= image.max()
    assert not torch.equal(out, image)
    gamma = replace(NOTHING, gamma_prob=1.0)
    out = apply_intensity(image, gamma, np.random.default_rng(0))
    assert not torch.allclose(out, image, atol=1e-3)
    for c in range(2):
        assert out[c].mean().item() == pytest.approx(image[c].mean().item(), abs=1e-4)
        assert out[c].std().item() == pytest.approx(image[c].std().item(), rel=1e-4)


def test_brightness_is_multiplicative_per_channel() -> None:
    image, _ = patch()
    cfg = replace(NOTHING, brightness_prob=1.0)
    out = apply_intensity(image, cfg, np.random.default_rng(0))
    for c in range(2):
        factor = (out[c] / image[c]).flatten()
        assert 0.75 <= factor[0].item() <= 1.25
        torch.testing.assert_close(factor, torch.full_like(factor, factor[0].item()))


def test_noise_is_additive_and_small() -> None:
    image = torch.zeros((2, 16, 16, 16))
    cfg = replace(NOTHING, noise_prob=1.0)
    out = apply_intensity(image, cfg, np.random.default_rng(1))
    assert 0 < out.std().item() <= 0.1 * 1.05
    assert abs(out.mean().item()) < 0.01


def test_channel_dropout_zeroes_whole_channels_and_keeps_one() -> None:
    cfg = replace(NOTHING, channel_dropout_prob=0.5)
    image = torch.randn(4, 6, 6, 6) + 3.0
    dropped_counts = set()
    for seed in range(64):
        out = apply_intensity(image, cfg, np.random.default_rng(seed))
        zero = [bool((out[c] == 0).all()) for c in range(4)]
        kept = [bool(torch.equal(out[c], image[c])) for c in range(4)]
        assert all(z != k for z, k in zip(zero, kept, strict=True))  # whole channels only
        assert not all(zero)
        dropped_counts.add(sum(zero))
    assert dropped_counts == {0, 1, 2, 3}
    always = replace(NOTHING, channel_dropout_prob=1.0)
    out = apply_intensity(image, always, np.random.default_rng(0))
    assert sum(bool((out[c] == 0).all()) for c in range(4)) == 3


def test_channel_dropout_leaves_one_channel_data_and_the_default_stream_alone() -> None:
    cfg = replace(NOTHING, channel_dropout_prob=1.0)
    one = torch.randn(1, 6, 6, 6)
    assert torch.equal(apply_intensity(one, cfg, np.random.default_rng(0)), one)
    # off (the default) draws nothing beyond the four probability checks (noise, brightness,
    # contrast, gamma), so the random stream of existing configs is unchanged
    gen_a, gen_b = np.random.default_rng(5), np.random.default_rng(5)
    apply_intensity(torch.randn(2, 6, 6, 6), NOTHING, gen_a)
    gen_b.random(4)
    assert gen_a.random() == gen_b.random()
    with pytest.raises(ValueError, match="augment probabilities"):
        AugmentConfig(channel_dropout_prob=1.5)


def test_thick_axis_follows_nnunets_anisotropy_threshold() -> None:
    assert thick_axis((160, 160, 12)) == 2
    assert thick_axis((12, 160, 160)) == 0
    assert thick_axis((64, 64, 64)) is None
    assert thick_axis((96, 96, 32)) is None  # 3x exactly is not over the threshold


def test_thick_slice_rotation_turns_about_the_thick_axis_and_scales_in_plane() -> None:
    cfg = replace(NOTHING, rotate_scale_prob=1.0, rotation_deg=30.0, scale_range=(0.8, 1.2))
    for seed in range(20):
        iso = sample_spatial(cfg, np.random.default_rng(seed))
        flat = sample_spatial(cfg, np.random.default_rng(seed), in_plane_of=2)
        assert iso.matrix is not None and flat.matrix is not None
        m = flat.matrix
        assert np.allclose(m[2], [0, 0, 1]) and np.allclose(m[:, 2], [0, 0, 1])
        # in-plane: a rotation times one scale factor, the same as the isotropic draw's
        in_plane = m[:2, :2]
        assert np.allclose(in_plane @ in_plane.T, np.eye(2) * np.linalg.det(in_plane))
        assert np.isclose(
            abs(np.linalg.det(in_plane)) ** 0.5, abs(np.linalg.det(iso.matrix)) ** (1 / 3)
        )
        assert flat.flips == iso.flips  # the same draws: flips unchanged
        # the source region needs no margin along the thick axis beyond interpolation's
        assert source_shape(flat, (40, 40, 6))[2] == 6 + 2
