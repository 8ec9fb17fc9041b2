"""Where a case lies: its nonzero bounding box, cropping and uncropping, canonical orientation.

- :class:`CropBox` and :func:`nonzero_bbox`: nnU-Net's crop to the voxels nonzero in any
  channel; :func:`crop` and :func:`uncrop` move arrays into and out of the box.
- :func:`to_canonical`: every case is reordered and flipped to the array axis order closest to
  RAS (nibabel's canonical orientation; the affine follows, so world positions do not change),
  so axes mean the same in every case (the thick-slice axis of axial scans is always the last).

Arrays are numpy, ``(C, X, Y, Z)`` for images and ``(X, Y, Z)`` for labels, in the axis order
of :mod:`segmenter.io`. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from segmenter import io
from segmenter.evaluation.components import bounding_box

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class CropBox:
    """An axis-aligned box inside a volume.

    Attributes:
        lo: first voxel index per axis (inclusive).
        hi: end index per axis (exclusive).
        shape: shape ``(X, Y, Z)`` of the volume the box lies in.
    """

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not len(self.lo) == len(self.hi) == len(self.shape) == 3:
            raise ValueError(f"CropBox needs 3 axes, got lo={self.lo} hi={self.hi}")
        if any(not 0 <= a < b <= n for a, b, n in zip(self.lo, self.hi, self.shape, strict=True)):
            raise ValueError(f"CropBox {self.lo}..{self.hi} does not fit in shape {self.shape}")

    @property
    def size(self) -> tuple[int, int, int]:
        """Shape of the cropped region."""
        return tuple(b - a for a, b in zip(self.lo, self.hi, strict=True))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Slices selecting the box from an ``(X, Y, Z)`` array."""
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi, strict=True))  # type: ignore[return-value]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> CropBox:
        """The box covering all of a volume of ``shape``."""
        s = tuple(int(n) for n in shape)
        return cls((0, 0, 0), s, s)  # type: ignore[arg-type]


def nonzero_bbox(images: np.ndarray) -> CropBox:
    """Bounding box of the voxels that are nonzero in any channel.

    Args:
        images: ``(C, X, Y, Z)``.

    Returns:
        The box; the whole volume when every voxel is 0.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (C, X, Y, Z), got shape {images.shape}")
    shape = tuple(int(n) for n in images.shape[1:])
    box = bounding_box((images != 0).any(axis=0))
    if box is None:
        return CropBox.whole(shape)
    lo = tuple(s.start for s in box)
    hi = tuple(s.stop for s in box)
    return CropBox(lo, hi, shape)  # type: ignore[arg-type]


def crop(arr: np.ndarray, box: CropBox) -> np.ndarray:
    """Crop the last three axes of ``arr`` (``(..., X, Y, Z)``) to ``box`` (a contiguous copy)."""
    if tuple(arr.shape[-3:]) != box.shape:
        raise ValueError(f"array shape {arr.shape} does not end with the box's {box.shape}")
    return np.ascontiguousarray(arr[(Ellipsis, *box.slices)])


def uncrop(arr: np.ndarray, box: CropBox, fill: float = 0) -> np.ndarray:
    """Put a cropped ``(..., x, y, z)`` array back into the box's volume, ``fill`` outside."""
    if tuple(arr.shape[-3:]) != box.size:
        raise ValueError(f"array shape {arr.shape} does not end with the box size {box.size}")
    out = np.full(arr.shape[:-3] + box.shape, fill, dtype=arr.dtype)
    out[(Ellipsis, *box.slices)] = arr
    return out


def to_canonical(
    images: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    spacing: tuple[float, ...],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[float, ...], np.ndarray | None]:
    """Arrays reordered and flipped to the axis order closest to RAS (nibabel's canonical).

    Args:
        images: ``(C, X, Y, Z)``.
        label: ``(X, Y, Z)`` or None.
        affine: 4x4 voxel-to-RAS+ matrix.
        spacing: voxel size in mm per array axis.

    Returns:
        ``(images, label, affine, spacing, orientation)`` in canonical order; ``orientation``
        is the transform applied (None, and the inputs unchanged, when already canonical).
    """
    ornt = io.orientation_of(affine)
    if np.array_equal(ornt, io.CANONICAL_ORIENTATION):
        return images, label, affine, spacing, None
    shape = images.shape[1:]
    images = np.ascontiguousarray(np.stack([io.reorient(ch, ornt) for ch in images]))
    if label is not None:
        label = np.ascontiguousarray(io.reorient(label, ornt))
    new_affine = io.reoriented_affine(affine, ornt, shape)
    new_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        new_spacing[int(target)] = spacing[axis]
    return images, label, new_affine, tuple(new_spacing), ornt
