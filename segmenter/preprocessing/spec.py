"""The preprocessing settings of a case, as one value passed whole.

Training builds it from the config's ``data`` section, prediction from the run's plan, and the
preprocessed-case cache keys on it, so a new setting is added here (and in the one place that
applies it) instead of in every signature on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from segmenter.config import ChannelNormalization, DataConfig


def _floats(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


@dataclass(frozen=True)
class PreprocessingSpec:
    """How a case is preprocessed (training and prediction alike).

    Attributes:
        crop_to_nonzero: crop to the bounding box of the voxels nonzero in any channel.
        target_spacing: voxel size in mm (X, Y, Z) to resample to after cropping; None keeps
            each case's own spacing.
        clip_percentiles: ``(lo, hi)`` percentiles inside the nonzero mask that each z-scored
            channel is clipped to before its statistics are taken; None: no clipping.
        normalization: one scheme per channel; empty: every channel z-scored inside its
            nonzero mask (MRI).
    """

    crop_to_nonzero: bool = True
    target_spacing: tuple[float, ...] | None = None
    clip_percentiles: tuple[float, ...] | None = None
    normalization: tuple[ChannelNormalization, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_spacing", _floats(self.target_spacing))
        object.__setattr__(self, "clip_percentiles", _floats(self.clip_percentiles))
        object.__setattr__(self, "normalization", tuple(self.normalization))

    @classmethod
    def from_data(cls, data: DataConfig) -> PreprocessingSpec:
        """The settings of a config's ``data`` section."""
        return cls(
            crop_to_nonzero=data.crop_to_nonzero,
            target_spacing=data.target_spacing,
            clip_percentiles=data.clip_percentiles,
            normalization=data.normalization,
        )

    @property
    def has_ct(self) -> bool:
        """Whether a channel is normalised with dataset statistics (CT) instead of per case."""
        return any(n.scheme != "zscore_nonzero" for n in self.normalization)

    def cache_settings(self) -> dict[str, Any]:
        """The settings as plain JSON values for the cache key.

        Per-channel normalisation joins only when a channel is not plain z-scoring (so MRI
        cache keys written before it existed stay valid); numbers are floats, so a plan's ints
        and a config's floats give the same key, and channel names are left out.
        """
        settings: dict[str, Any] = {
            "crop_to_nonzero": bool(self.crop_to_nonzero),
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
            "clip_percentiles": (
                None if self.clip_percentiles is None else list(self.clip_percentiles)
            ),
        }
        if self.has_ct:
            settings["normalization"] = [
                {"scheme": n.scheme, "clip": None if n.clip is None else [float(v) for v in n.clip],
                 "mean": float(n.mean), "std": float(n.std)}
                for n in self.normalization
            ]  # fmt: skip
        return settings


__all__ = ["PreprocessingSpec"]
