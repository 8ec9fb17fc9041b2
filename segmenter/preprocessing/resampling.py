"""Resampling to a target spacing: the plan's target spacing rule, images, labels, probabilities.

Target spacing (nnU-Net's rule): the median spacing of the dataset per axis; when the data
are anisotropic (the coarsest axis of the median spacing is more than
:data:`ANISOTROPY_THRESHOLD` times the finest, and the median shape has fewer than
1 / :data:`ANISOTROPY_THRESHOLD` times as many voxels along it as along the others), the
coarse axis takes the 10th percentile of the cases' spacings along it instead, so that thick
slices are not interpolated to a spacing most cases do not have, while never going below the
other axes' spacing.

Images: cubic B-spline (order 3) on every axis, or, when the source spacing is anisotropic
(coarsest axis > 3x the finest), cubic in-plane and linear along the coarse axis, done as two
separable passes as nnU-Net does (cubic across thick slices overshoots). Probabilities: linear.

Labels: never nearest neighbour, which deletes lesions smaller than the new voxel. Each class
is resampled as its own one-hot map by linear interpolation and kept where it exceeds 0.5
(nnU-Net's rule, classes assigned in increasing order so a higher class wins on overlap).
Where a lesion would still vanish (a lesion narrower than the new voxel spacing can fall
between the new grid points below 0.5 everywhere), the new voxel with its highest
interpolated value is kept: each connected region of the interpolated map that reaches no
voxel above the threshold contributes that one voxel. A lesion of radius 1 voxel survives
1 mm -> 1.5 mm -> 1 mm (``tests/preprocessing/test_resampling.py``).

Grids: sizes are ``round(shape * spacing / new_spacing)``, at least 1, and voxel centres are
placed as ``scipy.ndimage.zoom(grid_mode=True)`` places them (the volume's outer faces stay
where they were, as a resize of the whole field of view). Arrays are numpy, ``(C, X, Y, Z)``
for images and ``(X, Y, Z)`` for labels; no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from segmenter.evaluation.components import label_components

#: Ratio of coarsest to finest spacing above which data count as anisotropic (nnU-Net: 3).
ANISOTROPY_THRESHOLD = 3.0
#: Interpolated one-hot value above which a label voxel is set.
LABEL_THRESHOLD = 0.5

Triple = tuple[float, float, float]


def _triple(values: Sequence[float], name: str) -> Triple:
    vals = [float(v) for v in values]
    if len(vals) != 3 or not all(np.isfinite(vals)) or min(vals) <= 0:
        raise ValueError(f"{name} must be three positive numbers, got {list(values)}")
    return (vals[0], vals[1], vals[2])


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> Triple:
    """The plan's target spacing from the cases' spacings and shapes (module docstring).

    Args:
        spacings: per case, voxel size in mm (X, Y, Z).
        shapes: per case, array shape (X, Y, Z), same order.

    Returns:
        Target spacing in mm.

    Raises:
        ValueError: no cases, mismatched lengths, or bad values.
    """
    if not spacings or len(spacings) != len(shapes):
        raise ValueError("target_spacing needs one spacing and one shape per case")
    sp = np.array([_triple(s, "spacing") for s in spacings])
    sh = np.array([[float(n) for n in s] for s in shapes])
    target = np.median(sp, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    median_shape = np.median(sh, axis=0)
    # voxel counts along each axis once resampled to the median spacing
    size = median_shape * np.median(sp, axis=0) / target
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    aniso_voxels = size[worst] * ANISOTROPY_THRESHOLD < min(size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        coarse = float(np.percentile(sp[:, worst], 10))
        target[worst] = max(coarse, max(target[a] for a in others) + 1e-5)
    return (float(target[0]), float(target[1]), float(target[2]))


def new_shape(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Grid size after resampling ``shape`` from ``spacing`` to ``new_spacing`` (>= 1 voxel)."""
    sp, nsp = _triple(spacing, "spacing"), _triple(new_spacing, "new_spacing")
    out = [max(1, int(round(n * s / t))) for n, s, t in zip(shape, sp, nsp, strict=True)]
    return (out[0], out[1], out[2])


def is_anisotropic(spacing: Sequence[float]) -> bool:
    """Whether the coarsest axis is more than :data:`ANISOTROPY_THRESHOLD` x the finest."""
    sp = _triple(spacing, "spacing")
    return max(sp) > ANISOTROPY_THRESHOLD * min(sp)


def _zoom(arr: np.ndarray, shape: Sequence[int], order: int, axes: Sequence[int]) -> np.ndarray:
    """``arr`` (X, Y, Z) resized to ``shape`` along ``axes`` only, spline ``order``."""
    factors = [1.0, 1.0, 1.0]
    for a in axes:
        factors[a] = shape[a] / arr.shape[a]
    if all(f == 1.0 for f in factors):
        return arr
    out = ndi.zoom(arr, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != tuple(shape[a] if a in axes else arr.shape[a] for a in range(3)):
        raise AssertionError(f"zoom gave {out.shape}, wanted {tuple(shape)}")  # scipy contract
    return out


def resample_volume(
    arr: np.ndarray, spacing: Sequence[float], shape: Sequence[int], *, order: int
) -> np.ndarray:
    """One ``(X, Y, Z)`` float volume to ``shape``: ``order`` on every axis, or on an anisotropic
    source ``order`` in-plane and at most linear along the coarse axis (two passes)."""
    src = np.asarray(arr, dtype=np.float32)
    if tuple(src.shape) == tuple(shape):
        return src
    if order > 1 and is_anisotropic(spacing):
        coarse = int(np.argmax(_triple(spacing, "spacing")))
        in_plane = [a for a in range(3) if a != coarse]
        out = _zoom(src, shape, order, in_plane)
        return _zoom(out, shape, 1, [coarse]).astype(np.float32, copy=False)
    return _zoom(src, shape, order, [0, 1, 2]).astype(np.float32, copy=False)


def resample_image(
    image: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 3,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """``(C, X, Y, Z)`` channels resampled to ``new_spacing`` (or exactly to ``shape``).

    Args:
        image: float channels.
        spacing: their voxel size in mm.
        new_spacing: wanted voxel size in mm.
        order: spline order in-plane (3: cubic, 1: linear); see the module docstring.
        shape: target grid, default :func:`new_shape`.

    Returns:
        ``(C, *shape)`` float32.
    """
    if image.ndim != 4:
        raise ValueError(f"resample_image expects (C, X, Y, Z), got shape {image.shape}")
    target = tuple(shape) if shape is not None else new_shape(image.shape[1:], spacing, new_spacing)
    return np.stack([resample_volume(ch, spacing, target, order=order) for ch in image])


def resample_label(
    label: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    shape: Sequence[int] | None = None,
    keep_small: bool = True,
) -> np.ndarray:
    """Integer label map resampled by linear interpolation of each class's one-hot map.

    Args:
        label: ``(X, Y, Z)`` non-negative integer labels (0 is background).
        spacing: its voxel size in mm.
        new_spacing: wanted voxel size in mm.
        shape: target grid, default :func:`new_shape`.
        keep_small: keep one voxel of every region that would vanish (module docstring).

    Returns:
        ``(*shape)`` labels of ``label``'s dtype.
    """
    if label.ndim != 3:
        raise ValueError(f"resample_label expects (X, Y, Z), got shape {label.shape}")
    target = tuple(shape) if shape is not None else new_shape(label.shape, spacing, new_spacing)
    if tuple(label.shape) == target:
        return label.copy()
    out = np.zeros(target, dtype=label.dtype)
    for value in np.unique(label):
        if value == 0:
            continue
        prob = resample_volume((label == value).astype(np.float32), spacing, target, order=1)
        keep = prob > LABEL_THRESHOLD
        if keep_small:
            keep |= _rescue(prob, keep)
        out[keep] = value
    return out


def _rescue(prob: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The peak voxel of every connected region of ``prob > 0`` that ``keep`` misses."""
    support = prob > 1e-3
    extra = np.zeros(prob.shape, dtype=bool)
    if not support.any():
        return extra
    regions, n = label_components(support, connectivity=26)
    ids = np.arange(1, n + 1)
    peaks = np.asarray(ndi.maximum(prob, regions, ids))
    kept = np.asarray(ndi.maximum(keep.astype(np.uint8), regions, ids)) > 0
    missing = ids[~kept & (peaks > 0)]
    for pos in ndi.maximum_position(prob, regions, missing):
        extra[tuple(int(i) for i in pos)] = True
    return extra


def resample_probabilities(
    prob: np.ndarray, spacing: Sequence[float], shape: Sequence[int]
) -> np.ndarray:
    """Probabilities (``(X, Y, Z)`` or ``(K, X, Y, Z)``) back to ``shape`` by linear
    interpolation (``spacing``: their current voxel size, for the anisotropy rule)."""
    if prob.ndim == 3:
        return np.clip(resample_volume(prob, spacing, shape, order=1), 0.0, 1.0)
    return np.stack([resample_probabilities(p, spacing, shape) for p in prob])
