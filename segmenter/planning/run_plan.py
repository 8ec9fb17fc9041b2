"""The run plan: what a trained run fixes and ``predict`` must repeat (a run's ``plan.json``).

Not to be confused with the dataset plan of ``segmenter plan`` (:mod:`segmenter.planning.planner`),
which suggests config values for a dataset. A run plan records, for one trained run: the input
channels and labels, the output activation, the patch (the sliding window), the preprocessing
(:class:`~segmenter.preprocessing.spec.PreprocessingSpec`), the fold it was trained on and the
default post-processing (threshold, minimum lesion size). It is written into ``plan.json`` and into
every checkpoint, and read back by :meth:`RunPlan.from_json`, which migrates older formats.

Formats:

- 0: no ``format_version`` key (runs written before it existed). Older still: ``normalization``
  was the string ``"zscore_nonzero"`` (before CT support), and ``target_spacing``,
  ``clip_percentiles`` and ``file_ending`` could be missing (before resampling, clipping and
  other file endings); they read as every channel z-scored, no resampling, no clipping and
  ``.nii.gz``.
- 1: the same keys, all present, plus ``format_version``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from segmenter.config import ChannelNormalization, config_from_dict, config_to_dict
from segmenter.errors import InputError
from segmenter.evaluation.report import json_safe
from segmenter.preprocessing.spec import PreprocessingSpec

FORMAT_VERSION = 1
FOREGROUND_RULE = "all labels > 0 are one lesion class"


@dataclass(frozen=True)
class RunPlan:
    """A trained run's plan (see the module docstring).

    Attributes:
        dataset: the training dataset's name.
        channel_names: input channels in order.
        labels: dataset.json's label map (name -> value).
        file_ending: image file ending of the dataset (``.nii.gz``).
        activation: ``sigmoid`` or ``softmax`` output.
        out_channels: the network's output channels.
        patch_size: training patch, the sliding window at inference (voxels).
        preprocessing: how cases are preprocessed.
        median_spacing: median voxel size (mm) of the preprocessed training cases.
        threshold: default probability threshold of ``predict``.
        min_lesion_mm3: default minimum lesion size of ``predict``.
        fold: the fold trained on (an int or ``"all"``); None before training chose one.
        threshold_tuning: how ``threshold`` was tuned (criterion and grid rows), or None.
        format_version: the format this plan was read from or will be written in.
    """

    dataset: str
    channel_names: tuple[str, ...]
    labels: Mapping[str, int]
    activation: str
    out_channels: int
    patch_size: tuple[int, int, int]
    preprocessing: PreprocessingSpec
    median_spacing: tuple[float, ...]
    threshold: float
    min_lesion_mm3: float
    file_ending: str = ".nii.gz"
    fold: int | str | None = None
    threshold_tuning: Mapping[str, Any] | None = None
    format_version: int = field(default=FORMAT_VERSION)

    def with_postprocessing(self, threshold: float, min_lesion_mm3: float) -> RunPlan:
        """A copy whose default threshold and minimum lesion size are these."""
        return dataclasses.replace(
            self, threshold=float(threshold), min_lesion_mm3=float(min_lesion_mm3)
        )

    def with_threshold(self, threshold: float, tuning: Mapping[str, Any]) -> RunPlan:
        """A copy with a tuned default threshold and how it was tuned."""
        return dataclasses.replace(self, threshold=float(threshold), threshold_tuning=tuning)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values, the keys of ``plan.json`` (the current format)."""
        spec = self.preprocessing
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "channel_names": list(self.channel_names),
            "labels": dict(self.labels),
            "file_ending": self.file_ending,
            "activation": self.activation,
            "out_channels": self.out_channels,
            "foreground": FOREGROUND_RULE,
            "patch_size": list(self.patch_size),
            "normalization": [config_to_dict(n) for n in spec.normalization],
            "crop_to_nonzero": spec.crop_to_nonzero,
            "median_spacing": list(self.median_spacing),
            "clip_percentiles": _list(spec.clip_percentiles),
            "target_spacing": _list(spec.target_spacing),
            "threshold": self.threshold,
            "min_lesion_mm3": self.min_lesion_mm3,
            "fold": self.fold,
        }
        if self.threshold_tuning is not None:  # an undefined score (NaN) is null, as in JSON
            out["threshold_tuning"] = json_safe(dict(self.threshold_tuning))
        return out

    @classmethod
    def from_json(cls, values: Mapping[str, Any], source: str = "plan") -> RunPlan:
        """Read a plan of any known format (older ones through :func:`migrate`).

        Raises:
            InputError: a newer format than this version reads, or missing or bad entries
                (the message names ``source``).
        """
        v = migrate(values, source)
        try:
            spec = PreprocessingSpec(
                crop_to_nonzero=bool(v["crop_to_nonzero"]),
                target_spacing=v["target_spacing"],
                clip_percentiles=v["clip_percentiles"],
                normalization=_normalization(v["normalization"]),
            )
            return cls(
                dataset=str(v["dataset"]),
                channel_names=tuple(str(c) for c in v["channel_names"]),
                labels={str(k): int(n) for k, n in dict(v["labels"]).items()},
                activation=str(v["activation"]),
                out_channels=int(v["out_channels"]),
                patch_size=_triple(v["patch_size"]),
                preprocessing=spec,
                median_spacing=tuple(float(s) for s in v["median_spacing"]),
                threshold=float(v["threshold"]),
                min_lesion_mm3=float(v["min_lesion_mm3"]),
                file_ending=str(v["file_ending"]),
                fold=v.get("fold"),
                threshold_tuning=v.get("threshold_tuning"),
                format_version=int(values.get("format_version", 0)),
            )
        except KeyError as exc:
            raise InputError(f"{source}: run plan has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: bad run plan entry ({exc})") from None


def migrate(values: Mapping[str, Any], source: str = "plan") -> dict[str, Any]:
    """The plan's entries in the current format (format 0 -> 1: fill in what older runs lack).

    Raises:
        InputError: not a mapping, or a format newer than :data:`FORMAT_VERSION`.
    """
    if not isinstance(values, Mapping):
        raise InputError(f"{source}: a run plan must be a mapping, got {type(values).__name__}")
    version = values.get("format_version", 0)
    if not isinstance(version, int) or version < 0:
        raise InputError(f"{source}: bad run plan format_version {version!r}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{source}: run plan format {version} is newer than this segmenter reads "
            f"({FORMAT_VERSION}); update segmenter"
        )
    out = dict(values)
    if version == 0:
        names = [str(c) for c in out.get("channel_names", [])]
        if not isinstance(out.get("normalization"), list):  # "zscore_nonzero", before CT
            out["normalization"] = [{"channel": n} for n in names]
        out.setdefault("target_spacing", None)
        out.setdefault("clip_percentiles", None)
        out.setdefault("file_ending", ".nii.gz")
    out["format_version"] = FORMAT_VERSION
    return out


def _normalization(records: Any) -> tuple[ChannelNormalization, ...]:
    """Per-channel schemes, built and checked as the config's ``data.normalization``."""
    return config_from_dict({"data": {"normalization": list(records)}}).data.normalization


def _triple(values: Any) -> tuple[int, int, int]:
    a, b, c = (int(v) for v in values)
    return (a, b, c)


def _list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


__all__ = ["FORMAT_VERSION", "RunPlan", "migrate"]
