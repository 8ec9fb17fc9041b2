"""Training-time augmentation of one patch, cheap enough for 2 CPU cores.

The recipe follows nnU-Net's default 3D pipeline, reduced to what pays off on a CPU budget:
rotation + isotropic scaling (one trilinear ``grid_sample`` for image and label together),
mirroring, Gaussian noise, multiplicative brightness, contrast and gamma, and (off by default)
channel dropout. Probabilities and ranges come from :class:`segmenter.config.AugmentConfig`.

Layouts: ``image`` is a ``(C, X, Y, Z)`` float32 tensor, ``label`` a ``(1, X, Y, Z)`` tensor with
values in {0, 1} (float32 on output). All randomness comes from an explicit
``numpy.random.Generator`` (parameters and noise); nothing touches a global RNG.

Rotation without empty corners: the spatial transform is drawn first
(:func:`sample_spatial`), :func:`source_shape` says how large a region around the patch it
reads, and the caller (the patch sampler) crops that larger region from the volume, as
nnU-Net does. :func:`augment` on a patch alone reads zeros (padding) where the rotated patch
leaves its input. The label is resampled linearly and thresholded at 0.5, so a lesion of
1-voxel radius survives a rotation (nearest-neighbour sampling can drop it).

Rotation and scaling act in voxel space, which suits (near) isotropic voxels. For thick-slice
patches (:func:`thick_axis`: the longest patch axis over 3x the shortest, nnU-Net's
``ANISO_THRESHOLD`` rule for its "dummy 2D" augmentation) the rotation turns about the thick
axis only and the scaling acts in-plane only: a tilt out of the slice plane would mix slices
7 mm apart as if they were 0.5 mm apart, and read mostly padding from a 16-slice volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.config import AugmentConfig
from segmenter.rotation import rotation_matrix

#: Ranges of the intensity augmentations (nnU-Net's defaults).
BRIGHTNESS_RANGE = (0.75, 1.25)
CONTRAST_RANGE = (0.75, 1.25)
GAMMA_RANGE = (0.7, 1.5)
NOISE_STD_MAX = 0.1
#: Linear label values at or above this are foreground after resampling.
LABEL_THRESHOLD = 0.5
#: A patch whose longest axis is more than this many times its shortest is thick-slice data:
#: spatial augmentation stays in-plane (nnU-Net's ``ANISO_THRESHOLD``).
ANISO_THRESHOLD = 3.0


def thick_axis(patch_size: Sequence[int]) -> int | None:
    """The patch's thick (shortest) axis when its longest axis is over :data:`ANISO_THRESHOLD`
    times it (a thick-slice plan: 160x160x12 gives 2), else None."""
    size = [int(s) for s in patch_size]
    short = int(np.argmin(size))
    return short if max(size) > ANISO_THRESHOLD * size[short] else None


@dataclass(frozen=True)
class SpatialParams:
    """A drawn spatial augmentation.

    Attributes:
        matrix: ``3x3`` map from an output voxel's offset to the patch centre to the source
            offset (voxel units, X/Y/Z order), or None when there is no rotation/scaling.
        flips: whether to mirror X, Y, Z.
    """

    matrix: np.ndarray | None
    flips: tuple[bool, bool, bool]


def sample_spatial(
    cfg: AugmentConfig, gen: np.random.Generator, *, in_plane_of: int | None = None
) -> SpatialParams:
    """Draw flips and, with probability ``rotate_scale_prob``, a rotation + isotropic scaling.

    Angles are uniform in ``[-rotation_deg, rotation_deg]`` per axis and the scale factor
    uniform in ``scale_range``; a factor above 1 enlarges the content (zoom in).

    Args:
        cfg: augmentation settings; with ``enabled`` False nothing is drawn.
        gen: random generator.
        in_plane_of: a thick axis (:func:`thick_axis`): the rotation turns about it only and
            the scaling leaves it alone (the same draws, so the stream does not change).

    Returns:
        The :class:`SpatialParams`.
    """
    if not cfg.enabled:
        return SpatialParams(None, (False, False, False))
    matrix = None
    if gen.random() < cfg.rotate_scale_prob:
        limit = math.radians(cfg.rotation_deg)
        angles = gen.uniform(-limit, limit, size=3)
        scale = gen.uniform(cfg.scale_range[0], cfg.scale_range[1])
        if in_plane_of is None:
            matrix = rotation_matrix(angles) / scale
        else:
            about = np.zeros(3)
            about[in_plane_of] = angles[in_plane_of]
            shrink = np.full(3, 1.0 / scale)
            shrink[in_plane_of] = 1.0
            matrix = rotation_matrix(about) @ np.diag(shrink)
    flips = tuple(bool(f) for f in gen.random(3) < cfg.flip_prob)
    return SpatialParams(matrix, flips)  # type: ignore[arg-type]


def source_shape(params: SpatialParams, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Shape of the region, centred on the patch, that the spatial transform reads.

    The patch size plus an equal margin on both sides (so the centres coincide on the voxel
    grid), wide enough for the rotated and scaled patch and one voxel of interpolation support.

    Args:
        params: from :func:`sample_spatial`.
        patch_size: output patch ``(X, Y, Z)``.

    Returns:
        The region shape; ``patch_size`` itself without rotation/scaling.
    """
    size = np.asarray(patch_size, dtype=np.int64)
    if params.matrix is None:
        return tuple(int(s) for s in size)  # type: ignore[return-value]
    half = np.abs(params.matrix) @ ((size - 1) / 2.0)
    margin = np.maximum(0, np.ceil(half - (size - 1) / 2.0 - 1e-6)).astype(np.int64) + 1
    return tuple(int(s) for s in size + 2 * margin)  # type: ignore[return-value]


def apply_spatial(
    image: torch.Tensor,
    label: torch.Tensor,
    params: SpatialParams,
    patch_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotation/scaling and flips.

    Args:
        image: ``(C, *S)`` float32, the source region centred on the patch.
        label: ``(1, *S)`` values in {0, 1}.
        params: from :func:`sample_spatial`.
        patch_size: output ``(X, Y, Z)``; None means ``S``. Without rotation/scaling a larger
            source is centre-cropped.

    Returns:
        ``image (C, *patch_size)`` float32 and ``label (1, *patch_size)`` float32 in {0, 1}.
    """
    src = tuple(int(s) for s in image.shape[1:])
    out = src if patch_size is None else tuple(int(s) for s in patch_size)
    label = label.to(torch.float32)
    if params.matrix is not None:
        n_img = image.shape[0]
        both = torch.cat((image.to(torch.float32), label), dim=0)[None]
        # grid_sample's normalised coordinates (align_corners): index i <-> 2 i / (n - 1) - 1,
        # and its grid lists coordinates in reversed axis order (last axis first).
        m = np.diag(1.0 / np.maximum(np.asarray(src) - 1, 1)) @ params.matrix
        m = m @ np.diag(np.asarray(out) - 1.0)
        theta = np.zeros((3, 4))
        theta[:, :3] = m[::-1, ::-1]
        grid = F.affine_grid(
            torch.as_tensor(theta, dtype=torch.float32)[None],
            [1, both.shape[1], *out],
            align_corners=True,
        )
        both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        image = both[0, :n_img]
        label = (both[0, n_img:] >= LABEL_THRESHOLD).to(torch.float32)
    elif out != src:
        lo = [(s - o) // 2 for s, o in zip(src, out, strict=True)]
        if any(v < 0 or (s - o) % 2 for v, s, o in zip(lo, src, out, strict=True)):
            raise ValueError(f"source {src} cannot be centre-cropped to {out}")
        sl = (slice(None),) + tuple(slice(a, a + o) for a, o in zip(lo, out, strict=True))
        image, label = image[sl], label[sl]
    dims = [d + 1 for d, f in enumerate(params.flips) if f]
    if dims:
        image = torch.flip(image, dims)
        label = torch.flip(label, dims)
    return image.contiguous(), label.contiguous()


def apply_intensity(
    image: torch.Tensor, cfg: AugmentConfig, gen: np.random.Generator
) -> torch.Tensor:
    """Gaussian noise, brightness, contrast and gamma, each with its probability (per patch;
    the factors are drawn per channel), then channel dropout.

    - noise: add N(0, sigma^2), sigma uniform in ``[0, 0.1]``;
    - brightness: multiply by a factor in ``[0.75, 1.25]``;
    - contrast: scale around the channel mean by a factor in ``[0.75, 1.25]``, then clip to the
      channel's previous range (nnU-Net's ``preserve_range``);
    - gamma: rescale the channel to [0, 1], raise to gamma (half the draws in ``[0.7, 1)``,
      half in ``[1, 1.5]``), map back to the channel's own [min, max] range, then restore its
      mean and std (nnU-Net's ``retain_stats``), so the sign structure of z-scored data is kept;
    - channel dropout (``channel_dropout_prob`` > 0, two or more channels): each channel set to
      0 with that probability, at least one kept (not nnU-Net's; modality dropout as in
      HeMIS, Havaei et al. 2016).

    Args:
        image: ``(C, X, Y, Z)`` float32 (not modified).
        cfg: augmentation settings.
        gen: random generator.

    Returns:
        The augmented ``(C, X, Y, Z)`` float32 tensor (``image`` itself when nothing applied).
    """
    if not cfg.enabled:
        return image
    n_ch = image.shape[0]
    copied = False

    def writable() -> torch.Tensor:
        nonlocal image, copied
        if not copied:
            image = image.clone()
            copied = True
        return image

    if gen.random() < cfg.noise_prob:
        sigma = gen.uniform(0.0, NOISE_STD_MAX)
        noise = gen.standard_normal(tuple(image.shape), dtype=np.float32)
        noise *= np.float32(sigma)
        writable().add_(torch.from_numpy(noise))
    if gen.random() < cfg.brightness_prob:
        factors = gen.uniform(*BRIGHTNESS_RANGE, size=n_ch)
        writable().mul_(torch.as_tensor(factors, dtype=torch.float32).view(-1, 1, 1, 1))
    if gen.random() < cfg.contrast_prob:
        factors = gen.uniform(*CONTRAST_RANGE, size=n_ch)
        img = writable()
        for c in range(n_ch):
            ch = img[c]
            lo, hi = torch.aminmax(ch)
            mean = ch.mean()
            ch.sub_(mean).mul_(float(factors[c])).add_(mean).clamp_(lo, hi)
    if gen.random() < cfg.gamma_prob:
        img = writable()
        for c in range(n_ch):
            low = gen.random() < 0.5 and GAMMA_RANGE[0] < 1
            gamma = gen.uniform(GAMMA_RANGE[0], 1.0) if low else gen.uniform(1.0, GAMMA_RANGE[1])
            _gamma_(img[c], float(gamma))
    if cfg.channel_dropout_prob > 0 and n_ch > 1:
        dropped = gen.random(n_ch) < cfg.channel_dropout_prob
        if dropped.all():
            dropped[gen.integers(n_ch)] = False
        if dropped.any():
            writable()[torch.from_numpy(dropped)] = 0.0
    return image


def _gamma_(ch: torch.Tensor, gamma: float, eps: float = 1e-7) -> None:
    """In-place gamma of one channel on its [0, 1]-rescaled intensities, stats retained."""
    mean, std = ch.mean(), ch.std()
    lo, hi = torch.aminmax(ch)
    rng = hi - lo + eps
    ch.sub_(lo).div_(rng).pow_(gamma).mul_(rng).add_(lo)
    new_mean, new_std = ch.mean(), ch.std()
    ch.sub_(new_mean).mul_(std / (new_std + 1e-8)).add_(mean)


def augment(
    image: torch.Tensor,
    label: torch.Tensor,
    cfg: AugmentConfig,
    gen: np.random.Generator,
    *,
    patch_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one patch: spatial (rotation/scaling, flips), then intensity.

    Given only the patch (``patch_size`` None), a rotation reads zeros beyond its edges; the
    sampler avoids that by cropping :func:`source_shape` first and calling
    :func:`apply_spatial` / :func:`apply_intensity` itself.

    Args:
        image: ``(C, X, Y, Z)`` float32 tensor.
        label: ``(1, X, Y, Z)`` tensor, values in {0, 1}.
        cfg: augmentation settings (``enabled`` False returns the inputs, label as float32).
        gen: random generator; the same state gives the same result.
        patch_size: output size when the input is a larger centred region; None keeps the
            input's size.

    Returns:
        ``image (C, *patch)`` float32 and ``label (1, *patch)`` float32 in {0, 1}.
    """
    params = sample_spatial(cfg, gen)
    image, label = apply_spatial(image, label, params, patch_size)
    return apply_intensity(image, cfg, gen), label


__all__ = [
    "BRIGHTNESS_RANGE",
    "CONTRAST_RANGE",
    "GAMMA_RANGE",
    "LABEL_THRESHOLD",
    "NOISE_STD_MAX",
    "ANISO_THRESHOLD",
    "SpatialParams",
    "apply_intensity",
    "apply_spatial",
    "augment",
    "sample_spatial",
    "source_shape",
    "thick_axis",
]
