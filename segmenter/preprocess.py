"""Per-case preprocessing: canonical orientation, crop to nonzero, resample, z-score.

Every case is first reordered and flipped to the array axis order closest to RAS (nibabel's
canonical orientation; the affine follows, so world positions do not change), so that axes
mean the same thing in every case (the thick-slice axis of axial scans is always the last).

This is nnU-Net's rule for MRI: the nonzero mask of a case is the union over its channels of
the voxels that are not 0 (holes filled), the case is cropped to the mask's bounding box, and
each channel is normalised to mean 0 / std 1 with statistics taken inside the mask; voxels
outside the mask are set to 0. CT channels (``data.normalization``, written by ``segmenter
plan``) are instead clipped and z-scored with the dataset's statistics (:func:`normalise`).
Everything :mod:`segmenter.inference` needs to put a prediction
back into the scan's own geometry travels with the :class:`PreprocessedCase`.

Resampling to a target spacing (``target_spacing``, from the plan) happens in
:func:`resample_hook` after cropping, with :mod:`segmenter.resample`; ``target_spacing=None``
keeps the case's own spacing.

Arrays are numpy, ``(C, X, Y, Z)`` for images and ``(X, Y, Z)`` for labels, in the axis order of
:mod:`segmenter.io`. No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from segmenter import io, resample
from segmenter.components import bounding_box
from segmenter.config import ChannelNormalization
from segmenter.errors import InputError
from segmenter.prep_spec import PreprocessingSpec

if TYPE_CHECKING:
    from segmenter.data import Case

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- cropping


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


# ---------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class ZScoreStats:
    """Per-channel statistics of :func:`normalise`.

    Attributes:
        mean: mean inside the mask, per channel.
        std: standard deviation inside the mask, per channel (1.0 where it was 0).
        mask_voxels: number of voxels in the nonzero mask.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    mask_voxels: int


def nonzero_mask(images: np.ndarray) -> np.ndarray:
    """Voxels that are nonzero in any channel, holes filled (nnU-Net's nonzero mask).

    Args:
        images: ``(C, X, Y, Z)``.

    Returns:
        ``(X, Y, Z)`` bool.
    """
    mask = (images != 0).any(axis=0)
    return ndi.binary_fill_holes(mask)


def normalise(
    images: np.ndarray,
    clip_percentiles: Sequence[float] | None = None,
    schemes: Sequence[ChannelNormalization] = (),
) -> tuple[np.ndarray, ZScoreStats]:
    """Normalise each channel of a case (MRI: its own z-score; CT: the dataset's).

    ``zscore_nonzero`` channels (every channel when ``schemes`` is empty) go to mean 0, std 1
    inside the case's nonzero mask (over those channels: CT air is not 0) and to 0 outside it.
    An all-zero case uses the whole volume as its mask; a constant channel (std 0) is divided
    by 1. With ``clip_percentiles``
    ``(lo, hi)`` each such channel is first clipped to those percentiles of its values inside
    the mask, so a few saturated or spiking voxels (BraTS holds 32767s) neither shift the
    statistics nor end up hundreds of standard deviations out.

    ``ct_clip_zscore`` channels (nnU-Net's CT rule: Hounsfield units mean the same in every
    scan) are clipped to the scheme's ``clip`` and become ``(x - mean) / std`` with the
    scheme's dataset-wide statistics, over the whole volume (air stays air, not 0).

    Args:
        images: ``(C, X, Y, Z)`` finite values.
        clip_percentiles: ``(lo, hi)`` in [0, 100], or None for no clipping (z-score channels).
        schemes: one :class:`~segmenter.config.ChannelNormalization` per channel, or empty.

    Returns:
        The normalised ``(C, X, Y, Z)`` float32 array and the :class:`ZScoreStats` (for CT
        channels the scheme's mean and std).

    Raises:
        InputError: ``schemes`` has another length than the number of channels.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (C, X, Y, Z), got shape {images.shape}")
    if schemes and len(schemes) != images.shape[0]:
        raise InputError(
            f"data.normalization has {len(schemes)} entries but the case has "
            f"{images.shape[0]} channel(s); give one per channel (or none for MRI)"
        )
    is_ct = [bool(schemes) and schemes[c].scheme == "ct_clip_zscore" for c in range(len(images))]
    mri = [c for c, ct in enumerate(is_ct) if not ct]
    mask = nonzero_mask(images[mri]) if mri else np.ones(images.shape[1:], dtype=bool)
    if not mask.any():
        mask = np.ones_like(mask)
    outside = ~mask
    out = np.empty(images.shape, dtype=np.float32)
    means, stds = [], []
    for c in range(images.shape[0]):
        if is_ct[c]:
            scheme = schemes[c]
            assert scheme.clip is not None  # checked by ChannelNormalization
            np.clip(images[c], scheme.clip[0], scheme.clip[1], out=out[c], casting="unsafe")
            out[c] -= np.float32(scheme.mean)
            out[c] /= np.float32(scheme.std)
            means.append(float(scheme.mean))
            stds.append(float(scheme.std))
            continue
        values = images[c][mask].astype(np.float64)
        channel = images[c]
        if clip_percentiles is not None:
            lo, hi = np.percentile(values, tuple(clip_percentiles))
            values = np.clip(values, lo, hi)
            channel = np.clip(channel, lo, hi)
        mean = float(values.mean())
        std = float(values.std())
        if not std > 0:
            std = 1.0
        np.subtract(channel, mean, out=out[c], casting="unsafe")
        out[c] /= np.float32(std)
        out[c][outside] = 0.0
        means.append(mean)
        stds.append(std)
    return out, ZScoreStats(tuple(means), tuple(stds), int(mask.sum()))


# ------------------------------------------------------------------------- resampling hook


def resample_hook(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: tuple[float, ...],
    target_spacing: Sequence[float] | None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Resample a cropped case to ``target_spacing`` (the plan's), or leave it as it is.

    Called by :func:`preprocess_arrays` after cropping and before normalisation (nnU-Net's
    order). Images: cubic (linear across thick slices); label: linear on each class's one-hot
    map, small lesions kept (:mod:`segmenter.resample`). :meth:`PreprocessedCase.restore`
    applies the inverse to probabilities.

    Args:
        image: ``(C, X, Y, Z)`` float32.
        label: ``(X, Y, Z)`` uint8 or None.
        spacing: current voxel size in mm.
        target_spacing: wanted voxel size in mm, or None to keep ``spacing``.

    Returns:
        ``(image, label, spacing)`` after resampling.
    """
    if target_spacing is None or np.allclose(target_spacing, spacing, rtol=1e-5, atol=0):
        return image, label, spacing
    target = tuple(float(v) for v in target_spacing)
    shape = resample.new_shape(image.shape[1:], spacing, target)
    image = resample.resample_image(image, spacing, target, shape=shape)
    if label is not None:
        label = resample.resample_label(label, spacing, target, shape=shape)
    return image, label, target


# ------------------------------------------------------------------------------ orientation


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


# --------------------------------------------------------------------------------- per case


@dataclass(frozen=True, eq=False)
class PreprocessedCase:
    """A case ready for training or inference, and how to map results back.

    Attributes:
        case_id: the case identifier.
        image: ``(C, X, Y, Z)`` float32, cropped and z-scored (0 outside the nonzero mask).
        label: ``(X, Y, Z)`` uint8 on the same grid as ``image`` (cropped), None when unlabelled.
        box: where ``image`` lies in the reoriented (canonical), uncropped volume.
        affine: 4x4 voxel-to-RAS+ (mm) matrix of that reoriented, uncropped volume (the
            original image's when it was already closest to RAS).
        spacing: voxel size in mm of ``image`` along X, Y, Z.
        original_shape: ``(X, Y, Z)`` of the original image.
        orientation: nibabel orientation (3x2: target axis, flip per original axis) that took
            the original arrays to the canonical RAS axis order, or None when they were in it.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    box: CropBox
    affine: np.ndarray
    spacing: tuple[float, ...]
    original_shape: tuple[int, ...]
    orientation: np.ndarray | None = None

    @property
    def crop_affine(self) -> np.ndarray:
        """4x4 voxel-to-RAS+ matrix of the cropped grid of :attr:`image`."""
        shifted = self.affine.copy()
        shifted[:3, 3] = self.affine[:3, :3] @ np.asarray(self.box.lo, dtype=np.float64)
        shifted[:3, 3] += self.affine[:3, 3]
        return shifted

    def restore(self, arr: np.ndarray, fill: float = 0) -> np.ndarray:
        """Map an array on this case's grid back to the original image grid.

        When the case was resampled, ``arr`` is first resampled back to the crop box by linear
        interpolation (meant for probabilities; a label map would need
        :func:`segmenter.resample.resample_label`), then uncropped.

        Args:
            arr: ``(..., X, Y, Z)`` on the grid of :attr:`image` (e.g. probabilities, or a mask
                when the case was not resampled).
            fill: value outside the crop box.

        Returns:
            ``(..., *original_shape)``, in the original axis order.
        """
        if tuple(arr.shape[-3:]) != self.box.size:
            if arr.ndim == 3:
                arr = resample.resample_probabilities(arr, self.spacing, self.box.size)
            else:
                flat = arr.reshape(-1, *arr.shape[-3:])
                back = resample.resample_probabilities(flat, self.spacing, self.box.size)
                arr = back.reshape(*arr.shape[:-3], *self.box.size)
        out = uncrop(arr, self.box, fill=fill)
        if self.orientation is None:
            return out
        undo = io.orientation_between(io.CANONICAL_ORIENTATION, self.orientation)
        flat = out.reshape(-1, *out.shape[-3:])
        back = np.stack([io.reorient(v, undo) for v in flat])
        return np.ascontiguousarray(back.reshape(*out.shape[:-3], *self.original_shape))


def _check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(np.isinf(array).sum())
        raise InputError(f"{name}: non-finite voxels ({n_nan} NaN, {n_inf} inf of {array.size})")


def _as_label(label: np.ndarray, name: str) -> np.ndarray:
    _check_finite(label, name)
    if label.dtype.kind == "b":
        return label.astype(np.uint8)
    if label.dtype.kind not in "iuf":
        raise InputError(f"{name}: label voxel type {label.dtype} is not numeric")
    if label.dtype.kind == "f" and (label != np.rint(label)).any():
        raise InputError(f"{name}: non-integer label values")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise InputError(f"{name}: label values outside 0..255")
    return label.astype(np.uint8)


def preprocess_arrays(
    images: Sequence[np.ndarray],
    label: np.ndarray | None,
    affine: np.ndarray,
    spacing: Sequence[float],
    *,
    case_id: str,
    spec: PreprocessingSpec | None = None,
) -> PreprocessedCase:
    """Preprocess one case given as arrays: reorient, crop, resample, normalise.

    Args:
        images: one ``(X, Y, Z)`` array per channel, all the same shape, finite.
        label: ``(X, Y, Z)`` integer label (0 background) or None.
        affine: 4x4 voxel-to-world matrix of the original image.
        spacing: voxel size in mm along X, Y, Z.
        case_id: identifier used in error messages and kept on the result.
        spec: the settings (default: crop to nonzero, own spacing, no clipping, z-score);
            see :func:`resample_hook` and :func:`normalise` for what each does.

    Returns:
        The :class:`PreprocessedCase`.

    Raises:
        InputError: shape mismatch, non-finite voxels, bad label values (message names
            ``case_id``).
    """
    if not images:
        raise InputError(f"{case_id}: no image channels")
    shape = tuple(int(n) for n in images[0].shape)
    if len(shape) != 3:
        raise InputError(f"{case_id}: expected 3D channels, got shape {shape}")
    for c, img in enumerate(images):
        if tuple(img.shape) != shape:
            raise InputError(
                f"{case_id}: channel {c} shape {tuple(img.shape)} != channel 0 shape {shape}"
            )
        _check_finite(img, f"{case_id} channel {c}")
    stack = np.stack([np.asarray(img, dtype=np.float32) for img in images])
    lab = None
    if label is not None:
        if tuple(label.shape) != shape:
            raise InputError(f"{case_id}: label shape {tuple(label.shape)} != image shape {shape}")
        lab = _as_label(np.asarray(label), f"{case_id} label")
    spacing_t = tuple(float(s) for s in spacing)
    affine = np.asarray(affine, dtype=np.float64)
    spec = spec or PreprocessingSpec()
    stack, lab, affine, spacing_t, ornt = to_canonical(stack, lab, affine, spacing_t)
    box = nonzero_bbox(stack) if spec.crop_to_nonzero else CropBox.whole(stack.shape[1:])
    if box.size != stack.shape[1:]:
        stack = crop(stack, box)
        lab = crop(lab, box) if lab is not None else None
    stack, lab, spacing_t = resample_hook(stack, lab, spacing_t, spec.target_spacing)
    normalised, stats = normalise(stack, spec.clip_percentiles, spec.normalization)
    logger.debug("%s: box %s..%s, stats %s", case_id, box.lo, box.hi, stats)
    return PreprocessedCase(
        case_id=case_id,
        image=normalised,
        label=lab,
        box=box,
        affine=affine,
        spacing=spacing_t,
        original_shape=shape,
        orientation=ornt,
    )


def read_case(case: Case, *, with_label: bool = True) -> tuple[list[io.Image], np.ndarray | None]:
    """Read a case's channels (float32) and label, checked against channel 0.

    Args:
        case: a :class:`segmenter.data.Case` (channel files in order, label or None).
        with_label: also read ``case.label`` (when it has one).

    Returns:
        The channel images (``array (X, Y, Z)`` float32, ``affine``, ``spacing``, header) and
        the ``(X, Y, Z)`` uint8 label, or None.

    Raises:
        InputError: unreadable file, a channel or label whose shape differs from channel 0,
            NaN/inf voxels, bad label values; one line naming the file.
    """
    images = [io.read_image(case.images[0], dtype=np.float32)]
    shape = images[0].array.shape
    for path in case.images[1:]:
        img = io.read_image(path, dtype=np.float32)
        if img.array.shape != shape:
            raise InputError(
                f"{path}: shape {io.describe(img.array.shape)} differs from channel 0 "
                f"{case.images[0].name} shape {io.describe(shape)}"
            )
        images.append(img)
    for path, img in zip(case.images, images, strict=True):
        _check_finite(img.array, str(path))
    if not with_label or case.label is None:
        return images, None
    label = io.read_image(case.label).array
    if label.shape != shape:
        raise InputError(
            f"{case.label}: label shape {io.describe(label.shape)} differs from image "
            f"{case.images[0].name} shape {io.describe(shape)}"
        )
    return images, _as_label(label, str(case.label))


def preprocess_case(case: Case, spec: PreprocessingSpec | None = None) -> PreprocessedCase:
    """Read (:func:`read_case`) and preprocess one dataset case.

    Args:
        case: a :class:`segmenter.data.Case`.
        spec: the settings (see :func:`preprocess_arrays`).

    Returns:
        The :class:`PreprocessedCase`; ``affine`` and ``spacing`` come from channel 0.

    Raises:
        InputError: as :func:`read_case`.
    """
    images, label = read_case(case)
    return preprocess_arrays(
        [img.array for img in images], label, images[0].affine, images[0].spacing,
        case_id=case.case_id, spec=spec,
    )  # fmt: skip


__all__ = [
    "CropBox",
    "PreprocessedCase",
    "ZScoreStats",
    "crop",
    "nonzero_bbox",
    "nonzero_mask",
    "preprocess_arrays",
    "preprocess_case",
    "read_case",
    "resample_hook",
    "uncrop",
    "normalise",
]
