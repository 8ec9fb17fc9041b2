"""Tests for segmenter.inference.sliding_window on fake models with known weights: windows that
reproduce the direct forward, mirroring TTA, and the foreground probability of known logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segmenter.config import InferenceConfig
from segmenter.inference import sliding_window as sw
from segmenter.inference.sliding_window import (
    MIRROR_AXES,
    foreground_probability,
    predict_logits,
    sliding_window_logits,
)

CPU = torch.device("cpu")


def pointwise_model() -> torch.nn.Conv3d:
    """A 1x1x1 convolution: ``2 * channel 0 - channel 1 + 0.5`` (equivariant under flips)."""
    conv = torch.nn.Conv3d(2, 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1, 1))
        conv.bias.fill_(0.5)
    return conv.eval()


def shift_model() -> torch.nn.Conv3d:
    """A 3-tap convolution along X with weights 1, 2, 4 (not equivariant under an X flip)."""
    conv = torch.nn.Conv3d(1, 1, kernel_size=(3, 1, 1), padding=(1, 0, 0), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 3, 1, 1))
    return conv.eval()


def volume(channels: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float32)


def test_the_mirrorings_are_the_eight_subsets_of_the_spatial_axes() -> None:
    assert len(MIRROR_AXES) == len(set(MIRROR_AXES)) == 8
    assert MIRROR_AXES[0] == () and (2, 3, 4) in MIRROR_AXES
    assert all(set(axes) <= {2, 3, 4} for axes in MIRROR_AXES)


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_windows_over_an_odd_volume_give_the_direct_forward(overlap: float) -> None:
    model = pointwise_model()
    image = torch.from_numpy(volume(2, (37, 29, 13)))[None]
    with torch.no_grad():
        direct = model(image)
        windows = sliding_window_logits(model, image, (16, 16, 16), overlap=overlap)
    assert windows.shape == (1, 1, 37, 29, 13) and windows.dtype == torch.float32
    torch.testing.assert_close(windows, direct, atol=1e-5, rtol=1e-5)


def test_predict_logits_is_the_forward_of_the_whole_volume() -> None:
    image = volume(2, (37, 29, 13))
    cfg = InferenceConfig(sw_batch_size=3, tta=False)
    logits = predict_logits(pointwise_model(), image, (16, 16, 16), cfg, device=CPU)
    assert logits.shape == (1, 37, 29, 13) and logits.dtype == np.float32
    expected = 2.0 * image[0] - image[1] + 0.5
    np.testing.assert_allclose(logits[0], expected, atol=1e-5)
    image_before = image.copy()
    predict_logits(pointwise_model(), image, (16, 16, 16), cfg, device=CPU)
    np.testing.assert_array_equal(image, image_before)  # the input is not touched


def test_mirroring_a_flip_equivariant_model_changes_nothing() -> None:
    image = volume(2, (21, 18, 11), seed=1)
    cfg = InferenceConfig()
    model = pointwise_model()
    plain = predict_logits(model, image, (16, 16, 16), cfg, device=CPU, tta=False)
    mirrored = predict_logits(model, image, (16, 16, 16), cfg, device=CPU)  # cfg.tta is on
    np.testing.assert_allclose(mirrored, plain, atol=1e-5)


def test_mirroring_averages_a_kernel_with_its_reverse() -> None:
    # One window (the patch covers the volume): half the mirrorings flip X, which reverses the
    # kernel 1, 2, 4; their mean is the symmetric kernel 2.5, 2, 2.5.
    image = volume(1, (9, 7, 5), seed=2)
    cfg = InferenceConfig(tta=True)
    model = shift_model()
    plain = predict_logits(model, image, (16, 8, 8), cfg, device=CPU, tta=False)
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        np.testing.assert_allclose(plain, model(x)[0].numpy(), atol=1e-5)
        model.weight.copy_(torch.tensor([2.5, 2.0, 2.5]).view(1, 1, 3, 1, 1))
        symmetric = model(x)[0].numpy()
    mirrored = predict_logits(shift_model(), image, (16, 8, 8), cfg, device=CPU)
    np.testing.assert_allclose(mirrored, symmetric, atol=1e-5)
    assert np.abs(mirrored - plain).max() > 0.1


def test_sigmoid_probability_is_the_largest_class_probability() -> None:
    ln3 = math.log(3.0)
    one = np.array([0.0, ln3, -ln3], np.float32).reshape(1, 3, 1, 1)
    prob = foreground_probability(one, "sigmoid")
    assert prob.shape == (3, 1, 1) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.ravel(), [0.5, 0.75, 0.25], atol=1e-6)
    two = np.array([[0.0, -ln3, -ln3], [-ln3, ln3, -ln3]], np.float32).reshape(2, 3, 1, 1)
    np.testing.assert_allclose(foreground_probability(two, "sigmoid").ravel(), [0.5, 0.75, 0.25])


def test_softmax_probability_is_one_minus_the_background() -> None:
    ln2, ln3 = math.log(2.0), math.log(3.0)
    two = np.array([[0.0, 0.0], [ln3, -ln3]], np.float32).reshape(2, 2, 1, 1)
    prob = foreground_probability(two, "softmax")
    assert prob.shape == (2, 1, 1) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.ravel(), [0.75, 0.25], atol=1e-6)
    # two foreground classes: background 1 / (1 + 1 + 2) leaves 0.75 for the foreground
    three = np.array([0.0, 0.0, ln2], np.float32).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(foreground_probability(three, "softmax").ravel(), [0.75], atol=1e-6)


def test_windows_step_by_the_overlap_and_the_last_one_ends_at_the_edge() -> None:
    assert sw.window_starts(127, 64, 0.5) == [0, 32, 63]
    assert sw.window_starts(160, 64, 0.5) == [0, 32, 64, 96]
    assert sw.window_starts(127, 64, 0.25) == [0, 48, 63]
    assert sw.window_starts(64, 64, 0.5) == sw.window_starts(40, 64, 0.5) == [0]
    assert sw.window_starts(10, 4, 0.99) == list(range(7))  # the step is at least 1
    boxes = sw.window_boxes((127, 160, 126), (64, 64, 64), 0.5)
    assert len(boxes) == 3 * 4 * 3 and boxes[-1] == (slice(63, 127), slice(96, 160), slice(62, 126))


def test_the_gaussian_peaks_at_the_centre_and_never_reaches_zero() -> None:
    g = sw.gaussian_weights((8, 6, 5))
    assert g.shape == (8, 6, 5) and g.dtype == torch.float32
    assert float(g.max()) == pytest.approx(1.0) and float(g.min()) > 0.0
    torch.testing.assert_close(g, g.flip(0).flip(1).flip(2))  # symmetric about the centre
    assert int(g.sum(dim=(0, 1)).argmax()) == 2  # z: 5 voxels, centre 2


def test_one_pass_of_all_mirrored_copies_equals_one_pass_per_mirroring() -> None:
    model = shift_model()
    x = torch.from_numpy(volume(1, (12, 10, 8), seed=3)).view(2, 1, 6, 10, 8)
    with torch.no_grad():
        together = sw._mirrored_forward(model, x, MIRROR_AXES, None, together=True)
        apart = sw._mirrored_forward(model, x, MIRROR_AXES, None, together=False)
    torch.testing.assert_close(together, apart)


def test_single_axis_mirroring_runs_no_flip_and_the_three_single_flips() -> None:
    assert sw.mirror_set(False, "all") == sw.mirror_set(False, "single") == ((),)
    assert sw.mirror_set(True, "all") == MIRROR_AXES
    assert sw.mirror_set(True, "single") == ((), (2,), (3,), (4,))
    # X is flipped in 1 of the 4 single mirrorings: the mean kernel is 1.75, 2, 3.25
    image = volume(1, (9, 7, 5), seed=2)
    cfg = InferenceConfig(tta=True, mirroring="single")
    mirrored = predict_logits(shift_model(), image, (16, 8, 8), cfg, device=CPU)
    model = shift_model()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.75, 2.0, 3.25]).view(1, 1, 3, 1, 1))
        expected = model(torch.from_numpy(image)[None])[0].numpy()
    np.testing.assert_allclose(mirrored, expected, atol=1e-5)
    every = InferenceConfig(tta=True, mirroring="all")
    overridden = predict_logits(shift_model(), image, (16, 8, 8), every, device=CPU)
    assert np.abs(overridden - mirrored).max() > 0.1


class _Counting(torch.nn.Module):
    """Records the spatial shape of every batch the wrapped model sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[2:]))
        return self.model(x)


def test_a_whole_window_runs_the_image_in_one_forward_pass() -> None:
    image = volume(2, (37, 29, 13))
    counting = _Counting(pointwise_model())
    cfg = InferenceConfig(tta=False, window="whole")
    logits = predict_logits(counting, image, (16, 16, 16), cfg, device=CPU)
    assert counting.seen == [(37, 29, 16)]  # the image, each axis at least the patch
    np.testing.assert_allclose(logits[0], 2.0 * image[0] - image[1] + 0.5, atol=1e-5)
    patched = _Counting(pointwise_model())
    predict_logits(patched, image, (16, 16, 16), InferenceConfig(tta=False), device=CPU)
    assert len(patched.seen) > 1 and set(patched.seen) == {(16, 16, 16)}
    big = (1 << 9, 1 << 9, 1 << 7)  # 2^25 voxels: over the cap, back to the patch
    assert sw.inference_window((16, 16, 16), big, "whole") == (16, 16, 16)
    assert sw.inference_window((16, 16, 16), (20, 8, 30), "patch") == (16, 16, 16)
