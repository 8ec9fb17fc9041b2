"""U-Net topology from a config, a spacing and a patch: kernels, strides and filters per level.

Torch-free, so planning (``segmenter plan``) sizes patches and depth without importing torch;
:mod:`segmenter.nn.network` builds the network from it.

Anisotropy (nnU-Net's planning rule): with ``spacing`` given, an axis whose spacing is at least
twice the finest current spacing is not downsampled until the other axes have caught up, and
its convolution kernel is 1 (not 3) until then; once 3 a kernel stays 3. With ``patch_size``
given as well, an axis is only halved while its feature map stays >= 4 voxels (nnU-Net's
minimum feature-map size), so a level may keep the resolution of the one above it. Without
``spacing`` every level has stride 2 and kernel 3 on every axis.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from segmenter.config import ModelConfig

Triple = tuple[int, int, int]

#: Smallest feature-map size (voxels per axis) nnU-Net allows at the bottleneck.
MIN_FEATURE_MAP_SIZE = 4


@dataclass(frozen=True)
class Topology:
    """Per-level layout of the U-Net; level 0 is the input resolution.

    Attributes:
        kernels: convolution kernel per level and axis (X, Y, Z), 3 or 1; ``depth`` entries.
        strides: stride of each level's first convolution relative to the level above, per axis,
            1 or 2; ``strides[0] == (1, 1, 1)``; ``depth`` entries.
        filters: feature maps per level, ``base_filters * 2**level`` capped at ``max_filters``.
        encoder_convs: conv layers per encoder level; ``depth`` entries.
        decoder_convs: conv layers per decoder level (level 0 first); ``depth - 1`` entries.
    """

    kernels: tuple[Triple, ...]
    strides: tuple[Triple, ...]
    filters: tuple[int, ...]
    encoder_convs: tuple[int, ...]
    decoder_convs: tuple[int, ...]

    @property
    def depth(self) -> int:
        """Number of resolution levels, the input level included."""
        return len(self.strides)

    @property
    def divisor(self) -> Triple:
        """Product of the strides per axis: the padded input size is a multiple of it."""
        return _axis_products(self.strides)

    def scale(self, level: int) -> Triple:
        """Downsampling factor per axis of ``level`` relative to the input."""
        return _axis_products(self.strides[: level + 1])


def _axis_products(strides: Sequence[Triple]) -> Triple:
    return (
        math.prod(s[0] for s in strides),
        math.prod(s[1] for s in strides),
        math.prod(s[2] for s in strides),
    )


def _as_triple(name: str, value: Iterable[float] | None, *, integer: bool) -> list[float] | None:
    """``value`` as three floats, or None; ValueError unless three positive (integer) numbers."""
    if value is None:
        return None
    try:
        vals = list(value)
    except TypeError:
        vals = []
    ok = len(vals) == 3 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in vals
    )
    if ok and integer:
        ok = all(float(v).is_integer() for v in vals)
    if not ok:
        kind = "positive integers" if integer else "positive finite numbers"
        raise ValueError(f"{name} must be three {kind} (X, Y, Z), got {value!r}")
    return [float(v) for v in vals]


def plan_topology(
    cfg: ModelConfig,
    *,
    spacing: Iterable[float] | None = None,
    patch_size: Iterable[int] | None = None,
) -> Topology:
    """Kernels, strides and filters per level (nnU-Net's anisotropy rule, see module docstring).

    Args:
        cfg: model configuration; ``cfg.depth`` levels are always built.
        spacing: voxel spacing (X, Y, Z) in mm, or None for isotropic strides 2 and kernels 3.
        patch_size: training patch (X, Y, Z) in voxels, or None; when given, an axis is only
            halved while it keeps >= ``MIN_FEATURE_MAP_SIZE`` voxels.

    Returns:
        The :class:`Topology`.

    Raises:
        ValueError: ``spacing`` or ``patch_size`` is not three positive numbers.
    """
    spacing_mm = _as_triple("spacing", spacing, integer=False)
    patch = _as_triple("patch_size", patch_size, integer=True)
    filters = tuple(min(cfg.base_filters * 2**level, cfg.max_filters) for level in range(cfg.depth))
    cur_spacing = [1.0, 1.0, 1.0] if spacing_mm is None else spacing_mm
    cur_size = None if patch is None else [int(p) for p in patch]
    kernel = [1, 1, 1]
    kernels: list[Triple] = []
    strides: list[Triple] = [(1, 1, 1)]
    for level in range(cfg.depth):
        if level > 0:
            # Stride of this level: halve the axes that are within 2x of the finest spacing
            # among the axes that still have room (nnU-Net's get_pool_and_conv_props rule).
            room = [
                d for d in range(3) if cur_size is None or cur_size[d] >= 2 * MIN_FEATURE_MAP_SIZE
            ]
            finest = min((cur_spacing[d] for d in room), default=0.0)
            pooled = [d for d in room if cur_spacing[d] / finest < 2.0]
            for d in pooled:
                cur_spacing[d] *= 2.0
                if cur_size is not None:
                    cur_size[d] = math.ceil(cur_size[d] / 2)
            sx, sy, sz = (2 if d in pooled else 1 for d in range(3))
            strides.append((sx, sy, sz))
        finest_all = min(cur_spacing)
        kernel = [
            3 if k == 3 or cur_spacing[d] / finest_all < 2.0 else 1 for d, k in enumerate(kernel)
        ]
        kernels.append((kernel[0], kernel[1], kernel[2]))
    return Topology(
        kernels=tuple(kernels),
        strides=tuple(strides),
        filters=filters,
        encoder_convs=_per_level(cfg.encoder_convs, cfg.depth),
        decoder_convs=_per_level(cfg.decoder_convs, cfg.depth - 1),
    )


def _per_level(counts: Sequence[int], levels: int) -> tuple[int, ...]:
    """``counts`` extended to ``levels`` entries by repeating its last one (or cut to them)."""
    return tuple(counts[min(level, len(counts) - 1)] for level in range(levels))


def required_divisor(
    cfg: ModelConfig,
    *,
    spacing: Iterable[float] | None = None,
    patch_size: Iterable[int] | None = None,
) -> Triple:
    """Product of the strides per axis (X, Y, Z) for this config, spacing and patch size.

    Inputs of any size are accepted: the model pads each spatial axis up to a multiple of this
    divisor internally and crops the logits back. Choosing patch sizes that are multiples of it
    (e.g. 64^3 or 96^3 with the default depth 4 -> divisor 8) avoids that padding in training.
    """
    return plan_topology(cfg, spacing=spacing, patch_size=patch_size).divisor


__all__ = ["MIN_FEATURE_MAP_SIZE", "Topology", "Triple", "plan_topology", "required_divisor"]
