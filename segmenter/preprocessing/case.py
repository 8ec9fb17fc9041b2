"""One case from its files to network input, and the way back (:class:`PreprocessedCase`).

The steps, in nnU-Net's order, all set by a
:class:`~segmenter.preprocessing.spec.PreprocessingSpec`:

- read and check the channels and label (:func:`read_case`: same shape, finite voxels,
  integer labels);
- reorient to the axis order closest to RAS and crop to the nonzero box
  (:mod:`segmenter.preprocessing.geometry`);
- resample to the target spacing (:func:`resample_hook`, with
  :mod:`segmenter.preprocessing.resampling`; None keeps the case's own spacing);
- normalise (:mod:`segmenter.preprocessing.normalisation`).

Everything needed to put a prediction back into the scan's own grid travels with the
:class:`PreprocessedCase` (:meth:`PreprocessedCase.restore`). Arrays are numpy,
``(C, X, Y, Z)`` for images and ``(X, Y, Z)`` for labels. No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segmenter import io
from segmenter.errors import InputError
from segmenter.preprocessing import resampling
from segmenter.preprocessing.geometry import CropBox, crop, nonzero_bbox, to_canonical, uncrop
from segmenter.preprocessing.normalisation import normalise
from segmenter.preprocessing.spec import PreprocessingSpec

if TYPE_CHECKING:
    from segmenter.data.layout import Case


logger = logging.getLogger(__name__)


def resample_hook(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: tuple[float, ...],
    target_spacing: Sequence[float] | None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Resample a cropped case to ``target_spacing`` (the plan's), or leave it as it is.

    Called by :func:`preprocess_arrays` after cropping and before normalisation (nnU-Net's
    order). Images: cubic (linear across thick slices); label: linear on each class's one-hot
    map, small lesions kept (:mod:`segmenter.preprocessing.resampling`).
    :meth:`PreprocessedCase.restore` applies the inverse to probabilities.

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
    shape = resampling.new_shape(image.shape[1:], spacing, target)
    image = resampling.resample_image(image, spacing, target, shape=shape)
    if label is not None:
        label = resampling.resample_label(label, spacing, target, shape=shape)
    return image, label, target


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
        :func:`segmenter.preprocessing.resampling.resample_label`), then uncropped.

        Args:
            arr: ``(..., X, Y, Z)`` on the grid of :attr:`image` (e.g. probabilities, or a mask
                when the case was not resampled).
            fill: value outside the crop box.

        Returns:
            ``(..., *original_shape)``, in the original axis order.
        """
        if tuple(arr.shape[-3:]) != self.box.size:
            if arr.ndim == 3:
                arr = resampling.resample_probabilities(arr, self.spacing, self.box.size)
            else:
                flat = arr.reshape(-1, *arr.shape[-3:])
                back = resampling.resample_probabilities(flat, self.spacing, self.box.size)
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
    if label.size and label.min() < 0:
        raise InputError(f"{name}: negative label values (down to {label.min():g})")
    if label.size and label.max() > 255:
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


def _check_grid(path: Path, img: io.Image, ref: io.Image, what: str) -> None:
    """Refuse a file whose voxel grid (shape, then affine) is not channel 0's."""
    assert ref.path is not None
    if img.array.shape != ref.array.shape:
        raise InputError(
            f"{path}: {what}shape {io.describe(img.array.shape)} differs from channel 0 "
            f"{ref.path.name} shape {io.describe(ref.array.shape)}"
        )
    if not io.affines_close(img.affine, ref.affine):
        origin = float(np.abs(img.affine[:3, 3] - ref.affine[:3, 3]).max())
        axes = float(np.abs(img.affine[:3, :3] - ref.affine[:3, :3]).max())
        raise InputError(
            f"{path}: {what}grid differs from channel 0 {ref.path.name} (origin off by "
            f"{origin:.3g} mm, axes by {axes:.3g} mm): resample it onto channel 0's grid"
        )


def _check_declared(label: np.ndarray, path: Path, declared: Sequence[int]) -> None:
    """Refuse label values that ``dataset.json`` does not declare."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=1))
    outside = [int(v) for v in present if int(v) not in declared]
    if outside:
        shown = ", ".join(str(v) for v in outside[:5]) + (", ..." if len(outside) > 5 else "")
        allowed = ", ".join(str(v) for v in declared)
        raise InputError(
            f"{path}: undeclared label values {shown} (dataset.json labels: {allowed})"
        )


def read_case(case: Case, *, with_label: bool = True) -> tuple[list[io.Image], np.ndarray | None]:
    """Read a case's channels (float32) and label, checked against channel 0.

    Args:
        case: a :class:`segmenter.data.layout.Case` (channel files in order, label or None,
            the label values its dataset declares or None).
        with_label: also read ``case.label`` (when it has one).

    Returns:
        The channel images (``array (X, Y, Z)`` float32, ``affine``, ``spacing``, header) and
        the ``(X, Y, Z)`` uint8 label, or None.

    Raises:
        InputError: unreadable file, a channel or label on another grid than channel 0 (shape
            or affine), NaN/inf voxels, bad or undeclared label values; one line naming the file.
    """
    images = [io.read_image(case.images[0], dtype=np.float32)]
    for path in case.images[1:]:
        img = io.read_image(path, dtype=np.float32)
        _check_grid(path, img, images[0], "")
        images.append(img)
    for path, img in zip(case.images, images, strict=True):
        _check_finite(img.array, str(path))
    if not with_label or case.label is None:
        return images, None
    label_img = io.read_image(case.label)
    _check_grid(case.label, label_img, images[0], "label ")
    label = _as_label(label_img.array, str(case.label))
    if case.label_values is not None:
        _check_declared(label, case.label, case.label_values)
    return images, label


def preprocess_case(case: Case, spec: PreprocessingSpec | None = None) -> PreprocessedCase:
    """Read (:func:`read_case`) and preprocess one dataset case.

    Args:
        case: a :class:`segmenter.data.layout.Case`.
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
