"""Connected components and foreground boxes of 3D masks (numpy and cc3d only, no torch).

- :func:`label_components`: the one place that calls ``cc3d.connected_components``; labels
  ``1..n`` in raster order of each component's first voxel, as cc3d numbers them.
- :func:`component_sizes`: voxel count of each component, from its labels.
- :func:`bounding_box`: the box holding every foreground voxel, optionally grown by a margin.

Arrays are ``(X, Y, Z)`` in the axis order of :mod:`segmenter.io`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np

#: Neighbourhoods cc3d supports in 3D: faces (6), faces and edges (18), and corners too (26).
CONNECTIVITIES = (6, 18, 26)


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Label the connected components of a binary mask.

    Args:
        mask: ``(X, Y, Z)`` bool, or integer 0/1 (cc3d labels each nonzero value separately,
            so other values would split components).
        connectivity: 6, 18 or 26.

    Returns:
        ``(labels, n)``: ``labels`` has the mask's shape, an unsigned integer dtype chosen by
        cc3d (``uint16`` when it fits), 0 for background and ``1..n`` for the components in
        raster order of the mask's memory layout (C order for a C-contiguous mask, Fortran
        order for a Fortran-ordered one); an empty mask (no voxels, or none set) gives
        ``uint16`` zeros and 0.

    Raises:
        ValueError: ``connectivity`` is not 6, 18 or 26.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    if mask.size == 0 or not mask.any():
        return np.zeros(mask.shape, dtype=np.uint16), 0
    labels, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    return labels, int(n)


def component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of each component.

    Args:
        labels: component labels of any shape and layout (a label volume from
            :func:`label_components`, or the labels of some of its voxels), non-negative
            integers, 0 for background (not counted).
        n: number of components (the largest label).

    Returns:
        ``(n,)`` int64; entry ``k - 1`` counts label ``k``.
    """
    return np.bincount(labels.ravel(order="K"), minlength=n + 1)[1:]


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every nonzero voxel, grown by ``margin`` and clipped.

    Args:
        mask: ``(X, Y, Z)`` array; nonzero voxels are foreground.
        margin: voxels added on each side of each axis (the box stays inside the array).

    Returns:
        One ``slice(lo, hi)`` per axis (``hi`` exclusive, Python ints), or None when no voxel
        is set.

    Raises:
        ValueError: ``mask`` is not 3D or ``margin`` is negative.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be a 3D (X, Y, Z) array, got shape {mask.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    xy = mask.any(axis=2)
    box = []
    for axis, hits in enumerate((xy.any(axis=1), xy.any(axis=0), mask.any(axis=(0, 1)))):
        idx = np.flatnonzero(hits)
        if idx.size == 0:
            return None
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        box.append(slice(max(lo, 0), min(hi, mask.shape[axis])))
    return box[0], box[1], box[2]


def lesion_volumes_mm3(
    label: np.ndarray, spacing: Sequence[float], connectivity: int = 26
) -> list[float]:
    """Volume in mm3 of each connected component of ``label > 0``, largest first."""
    labels, n = label_components(np.asarray(label) > 0, connectivity)
    sizes = component_sizes(labels, n)
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    return sorted((float(n) * voxel_mm3 for n in sizes if n > 0), reverse=True)
