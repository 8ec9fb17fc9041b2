"""Fixtures of the preprocessing tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

AxcodeAffine = Callable[[tuple[str, str, str], tuple[float, float, float]], np.ndarray]


def _axcode_affine(codes: tuple[str, str, str], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel-to-world matrix whose array axes point along ``codes`` (e.g. L, P, S)."""
    direction = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    for i, (code, size) in enumerate(zip(codes, spacing, strict=True)):
        axis, sign = direction[code]
        affine[axis, i] = sign * size
    affine[:, 3] = (5.0, -3.0, 2.0, 1.0)
    return affine


@pytest.fixture(scope="session")
def axcode_affine() -> AxcodeAffine:
    """``axcode_affine(codes, spacing)``: an axis-aligned affine whose array axes point along
    ``codes`` (e.g. ``("L", "P", "S")``) with voxels of ``spacing`` mm."""
    return _axcode_affine
