"""Intensity normalisation per channel: MRI z-scored per case, CT with the dataset's statistics.

- ``zscore_nonzero`` (nnU-Net's MRI rule): mean 0 / std 1 with statistics taken inside the
  case's nonzero mask (:func:`nonzero_mask`: the union over channels of the nonzero voxels,
  holes filled), optionally after clipping to percentiles; voxels outside the mask become 0.
- ``ct_clip_zscore`` (nnU-Net's CT rule): clipped to the plan's window and z-scored with the
  dataset's mean and std, the same map in every scan.

No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from segmenter.config import ChannelNormalization
from segmenter.errors import InputError

if TYPE_CHECKING:
    pass


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
