"""Tests for segmenter.rotation: the Euler-angle convention shared by phantoms and augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmenter.rotation import rotation_matrix


def test_zero_angles_give_the_identity() -> None:
    np.testing.assert_array_equal(rotation_matrix(np.zeros(3)), np.eye(3))


def test_quarter_turn_about_z_maps_x_to_y() -> None:
    rot = rotation_matrix(np.array([0.0, 0.0, math.pi / 2]))
    np.testing.assert_allclose(rot @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)


def test_fixed_axes_order_is_x_then_y_then_z() -> None:
    a, b, c = 0.3, -0.7, 1.1
    rx = rotation_matrix(np.array([a, 0.0, 0.0]))
    ry = rotation_matrix(np.array([0.0, b, 0.0]))
    rz = rotation_matrix(np.array([0.0, 0.0, c]))
    np.testing.assert_allclose(rotation_matrix(np.array([a, b, c])), rz @ ry @ rx, atol=1e-12)
    np.testing.assert_allclose(rx, [[1, 0, 0], [0, math.cos(a), -math.sin(a)],
                                    [0, math.sin(a), math.cos(a)]], atol=1e-12)  # fmt: skip


def test_result_is_a_proper_rotation() -> None:
    rot = rotation_matrix(np.random.default_rng(0).uniform(-math.pi, math.pi, 3))
    assert rot.shape == (3, 3) and rot.dtype == np.float64
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
