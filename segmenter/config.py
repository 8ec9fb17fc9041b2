"""Experiment configuration: frozen dataclasses loaded from YAML.

Defaults live here; a YAML config names only what it changes. Unknown keys are an error that
lists the valid ones, and ``--set a.b=value`` overrides are parsed as YAML scalars and
type-checked against the field they set. This module never imports torch, so a bad config fails
in milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from segmenter.atomic import write_text
from segmenter.errors import InputError

#: Loss presets (:func:`segmenter.nn.losses.build_loss`).
LossName = Literal["focal_dice", "dice_ce", "dice", "focal"]
LOSS_NAMES: tuple[str, ...] = typing.get_args(LossName)
#: How logits become probabilities: each channel on its own, or across the channels.
Activation = Literal["sigmoid", "softmax"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
#: Lesion matching presets (:data:`segmenter.evaluation.lesions.PRESETS` holds their rules).
PresetName = Literal["isles22", "atlas", "brats23", "msseg", "panoptica"]
PRESET_NAMES: tuple[str, ...] = typing.get_args(PresetName)


class ConfigError(InputError):
    """An invalid configuration: unknown key, wrong type, value out of range."""


@dataclass(frozen=True)
class ChannelNormalization:
    """How one input channel is normalised (``data.normalization``, one entry per channel).

    Attributes:
        scheme: ``zscore_nonzero`` (MRI: z-score with the case's own statistics inside its
            nonzero mask, after ``data.clip_percentiles``; voxels outside the mask become 0) or
            ``ct_clip_zscore`` (CT: clip to ``clip``, then ``(x - mean) / std`` with the
            dataset's statistics, the same for every case, over the whole volume).
        channel: the channel's name, for the reader (``segmenter plan`` fills it in).
        clip: ``[lo, hi]`` intensities for ``ct_clip_zscore`` (the fingerprint's 0.5 and
            99.5 percentiles).
        mean: the dataset's mean intensity for ``ct_clip_zscore``.
        std: the dataset's standard deviation for ``ct_clip_zscore`` (> 0).
    """

    scheme: Literal["zscore_nonzero", "ct_clip_zscore"] = "zscore_nonzero"
    channel: str = ""
    clip: tuple[float, ...] | None = None
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.scheme != "ct_clip_zscore":
            return
        name = f" ({self.channel})" if self.channel else ""
        if self.clip is None or len(self.clip) != 2 or not self.clip[0] < self.clip[1]:
            raise ConfigError(
                f"data.normalization{name}: ct_clip_zscore needs clip: [lo, hi] with lo < hi, "
                f"got {None if self.clip is None else list(self.clip)}"
            )
        if not self.std > 0:
            raise ConfigError(f"data.normalization{name}: std must be > 0, got {self.std}")


@dataclass(frozen=True)
class DataConfig:
    """Training data, patch sampling and loading.

    Attributes:
        dataset: path of an nnU-Net raw dataset folder (``DatasetXXX_Name``). A relative path is
            resolved against the directory the command runs in.
        patch_size: training patch, voxels per axis (a later plan step derives it from data).
        batch_size: patches per step: the global batch; under ``torchrun`` each of the N ranks
            draws ``batch_size / N`` of them (it must divide), with ``foreground_fraction``
            applied per rank.
        foreground_fraction: share of patches centred on a lesion voxel (nnU-Net: 0.33).
        sampling: ``foreground`` (a random lesion voxel) or ``lesion`` (a lesion chosen
            uniformly, then a voxel in it, so small lesions are seen as often as large ones).
        num_workers: DataLoader worker processes (0 loads in the main process).
        crop_to_nonzero: crop each case to the bounding box of its nonzero voxels.
        target_spacing: voxel size (mm, X Y Z) every case is resampled to after cropping, in
            training and prediction (predictions go back to each input's own grid); null keeps
            each case's own spacing. ``segmenter plan`` suggests one (nnU-Net's rule).
        clip_percentiles: before z-scoring, clip each channel to these percentiles of its
            intensities inside the nonzero mask (robust to spikes and saturated voxels); null
            disables it (nnU-Net's MRI rule). Applies to ``zscore_nonzero`` channels.
        normalization: one :class:`ChannelNormalization` per input channel, in channel order;
            empty (the default) z-scores every channel inside its nonzero mask (MRI).
            ``segmenter plan`` writes it from dataset.json's channel names (``CT`` channels:
            ``ct_clip_zscore`` with the fingerprint's percentiles, mean and std).
        cache_dir: folder keeping preprocessed cases as memory-mapped ``.npy`` files
            (``segmenter.preprocessing.cache``), reused by every run with the same data and
            settings; a relative path starts at the working directory; empty: preprocess in memory.
    """

    dataset: str = ""
    patch_size: tuple[int, ...] = (64, 64, 64)
    batch_size: int = 2
    foreground_fraction: float = 0.33
    sampling: Literal["foreground", "lesion"] = "foreground"
    num_workers: int = 2
    crop_to_nonzero: bool = True
    target_spacing: tuple[float, ...] | None = None
    clip_percentiles: tuple[float, ...] | None = (0.5, 99.5)
    normalization: tuple[ChannelNormalization, ...] = ()
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.target_spacing is not None and (
            len(self.target_spacing) != 3 or min(self.target_spacing) <= 0
        ):
            raise ConfigError(
                f"data.target_spacing must be 3 positive sizes in mm or null, "
                f"got {list(self.target_spacing)}"
            )
        clip = self.clip_percentiles
        if clip is not None and not (len(clip) == 2 and 0.0 <= clip[0] < clip[1] <= 100.0):
            raise ConfigError(
                f"data.clip_percentiles must be [lo, hi] with 0 <= lo < hi <= 100, or null, "
                f"got {list(clip)}"
            )
        if len(self.patch_size) != 3 or min(self.patch_size) < 8:
            raise ConfigError(f"data.patch_size must be 3 sizes >= 8, got {self.patch_size}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError("data.foreground_fraction must be in [0, 1]")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")


@dataclass(frozen=True)
class AugmentConfig:
    """Data augmentation on training patches (cheap on 2 CPU cores).

    Attributes:
        enabled: switch all augmentation off with false.
        flip_prob: probability of mirroring along each axis.
        rotate_scale_prob: probability of a small rotation + scaling of a patch.
        rotation_deg: maximum absolute rotation per axis, degrees.
        scale_range: isotropic scaling factor range.
        brightness_prob: probability of a multiplicative brightness change (0.75..1.25).
        contrast_prob: probability of a contrast change (0.75..1.25 around the mean).
        gamma_prob: probability of a gamma change (0.7..1.5) on the rescaled intensities.
        noise_prob: probability of additive Gaussian noise (std up to 0.1).
        channel_dropout_prob: probability of each input channel being set to 0 (its
            normalised brain mean: a missing modality) in a patch, at least one channel kept;
            0 (the default) is off and draws nothing, and a one-channel dataset is never
            touched. Meant to stop a multi-modal network leaning on one channel.
    """

    enabled: bool = True
    flip_prob: float = 0.5
    rotate_scale_prob: float = 0.2
    rotation_deg: float = 15.0
    scale_range: tuple[float, ...] = (0.85, 1.15)
    brightness_prob: float = 0.15
    contrast_prob: float = 0.15
    gamma_prob: float = 0.15
    noise_prob: float = 0.1
    channel_dropout_prob: float = 0.0

    def __post_init__(self) -> None:
        probs = (self.flip_prob, self.rotate_scale_prob, self.brightness_prob,
                 self.contrast_prob, self.gamma_prob, self.noise_prob,
                 self.channel_dropout_prob)  # fmt: skip
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise ConfigError("augment probabilities must be in [0, 1]")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"augment.scale_range must be [low, high], got {self.scale_range}")


@dataclass(frozen=True)
class LossConfig:
    """Training loss (see ``segmenter.nn.losses`` and DESIGN's exact definitions).

    Attributes:
        name: ``focal_dice`` (default), ``dice_ce`` (nnU-Net parity), ``dice`` or ``focal``.
        activation: ``sigmoid`` (one channel per foreground class) or ``softmax``.
        gamma: focal exponent; 0 with ``alpha=None`` is plain BCE.
        alpha: focal class balance for the foreground, or None for none.
        weight: per-class weights of the focal / cross-entropy term, or None.
        smooth: Dice smoothing added to numerator and denominator.
        batch_dice: compute Dice over the whole batch instead of per sample (nnU-Net option).
        include_background: keep channel 0 in the Dice term.
        lambda_focal: weight of the focal (or cross-entropy) term.
        lambda_dice: weight of the Dice term.
        lambda_blob: weight of the per-lesion blob Dice term added to the loss (each connected
            lesion of the target scored on its own, so small lesions count as much as large
            ones; ``segmenter.nn.losses.blob_dice_loss``); 0: off.
        deep_supervision_weights: per-output weights, highest resolution first; None uses
            nnU-Net's rule (1/2^i, lowest resolution 0, normalised).
    """

    name: LossName = "focal_dice"
    activation: Activation = "sigmoid"
    gamma: float = 2.0
    alpha: float | None = None
    weight: tuple[float, ...] | None = None
    smooth: float = 1e-5
    batch_dice: bool = False
    include_background: bool = True
    lambda_focal: float = 1.0
    lambda_dice: float = 1.0
    lambda_blob: float = 0.0
    deep_supervision_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ConfigError(f"loss.gamma must be >= 0, got {self.gamma}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.alpha must be in [0, 1] or null, got {self.alpha}")
        if self.smooth < 0:
            raise ConfigError(f"loss.smooth must be >= 0, got {self.smooth}")
        if self.lambda_focal < 0 or self.lambda_dice < 0 or self.lambda_blob < 0:
            raise ConfigError("loss.lambda_focal, lambda_dice and lambda_blob must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """3D U-Net topology (see ``segmenter.nn.network``).

    Attributes:
        depth: number of resolution levels (the input level included); each further level halves
            the patch (nnU-Net's strides of 2).
        base_filters: feature maps at full resolution; doubled per level up to ``max_filters``.
            The default 8 is sized for CPUs (nnU-Net's GPU default: 32).
        max_filters: cap on feature maps (nnU-Net: 320 in 3D).
        encoder_convs: conv layers per encoder level, level 0 (full resolution) first; the last
            entry repeats for the deeper levels. Default ``[1, 2]``: one convolution at full
            resolution (as nnU-Net's residual-encoder presets, whose first stage has one
            block), two below; nnU-Net's plain U-Net is ``[2]``.
        decoder_convs: conv layers per decoder level, level 0 first, last entry repeating.
            Default ``[1]`` (nnU-Net ResEnc's decoder); nnU-Net's plain U-Net is ``[2]``.
        norm: normalisation layer: ``instance`` (nnU-Net), ``batch`` or ``group``.
        residual: residual blocks (the level's convs with a shortcut around them) instead of
            plain conv-norm-act layers.
        deep_supervision: also return logits from lower decoder levels (training only).
        dropout: dropout probability in the blocks (0 disables it).
        memory_format: tensor layout of the model and its inputs: ``channels_last`` (3D
            channels-last; oneDNN's convolutions on CPUs run 1.3-4x faster in it at these
            channel counts), ``contiguous``, or ``auto`` (channels-last on the CPU, contiguous on
            CUDA). Layout only: the results are the same up to rounding.
    """

    depth: int = 4
    base_filters: int = 8
    max_filters: int = 256
    encoder_convs: tuple[int, ...] = (1, 2)
    decoder_convs: tuple[int, ...] = (1,)
    norm: Literal["instance", "batch", "group"] = "instance"
    residual: bool = False
    deep_supervision: bool = False
    dropout: float = 0.0
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"

    def __post_init__(self) -> None:
        if not 2 <= self.depth <= 7:
            raise ConfigError(f"model.depth must be in 2..7, got {self.depth}")
        if self.base_filters < 1 or self.max_filters < self.base_filters:
            raise ConfigError("model.base_filters must be >= 1 and <= model.max_filters")
        for name in ("encoder_convs", "decoder_convs"):
            convs = getattr(self, name)
            if not convs or min(convs) < 1:
                raise ConfigError(f"model.{name} must be a non-empty list of counts >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop (see ``segmenter.training.loop``).

    Attributes:
        seed: seeds weights, sampling and augmentation (and the split, unless ``split_seed``).
        split_seed: seeds the cross-validation split of ``splits.json``; null: ``seed``. Fixing it
            lets runs with several seeds share their folds (``segmenter compare --seeds``).
        optimizer: ``adamw`` or ``sgd`` (nnU-Net: SGD, Nesterov, momentum 0.99, lr 1e-2).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay (nnU-Net: 3e-5).
        momentum: SGD momentum (Nesterov).
        scheduler: ``poly`` (nnU-Net, exponent 0.9) or ``cosine``.
        warmup_epochs: linear warm-up epochs before the schedule.
        epochs: number of epochs.
        iterations_per_epoch: optimiser steps per epoch (nnU-Net: 250).
        max_minutes: wall-clock budget; training ends cleanly at the first epoch boundary past it
            (and keeps the best checkpoint). null for no budget.
        grad_clip: max gradient norm (nnU-Net: 12); 0 disables clipping.
        precision: ``auto`` (bf16 on CPU when it is faster, fp16 on CUDA), ``fp32``, ``bf16``,
            ``fp16``.
        val_every: validate every N epochs (and after the last one).
        n_folds: cross-validation folds in ``splits.json``.
        best_metric: validation metric that picks ``best.pt``: ``lesion_f1``, ``dice`` or
            ``lesion_recall``.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: torch CPU threads (null: all cores).
        tune_threshold: after training, pick the probability threshold that maximises the
            harmonic mean of pooled lesion F1 and voxel Dice on the validation cases (best
            checkpoint, no TTA) and store it in the run as predict's default; false keeps
            ``inference.threshold``.
        validation: what training validates on (whole volumes, every ``val_every`` epochs;
            the scores pick ``best.pt`` and tune the threshold): ``held_out`` (the fold's
            validation cases), ``training`` (its training cases), ``none`` (no validation:
            the whole budget trains, ``best.pt`` is the last checkpoint and predict keeps
            ``inference.threshold``), or ``auto``: ``held_out`` for a fold number and ``none``
            for ``--fold all``, which has no held-out case (scores on the training cases would
            pick a checkpoint and threshold for data the model has seen; nnU-Net's fold
            ``all`` also keeps its final checkpoint).
    """

    seed: int = 0
    split_seed: int | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 3e-5
    momentum: float = 0.99
    scheduler: Literal["poly", "cosine"] = "poly"
    warmup_epochs: int = 0
    epochs: int = 100
    iterations_per_epoch: int = 50
    max_minutes: float | None = None
    grad_clip: float = 12.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    val_every: int = 5
    n_folds: int = 5
    best_metric: Literal["lesion_f1", "dice", "lesion_recall"] = "lesion_f1"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    tune_threshold: bool = True
    validation: Literal["auto", "held_out", "training", "none"] = "auto"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.iterations_per_epoch < 1:
            raise ConfigError("train.lr, train.epochs and train.iterations_per_epoch must be > 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError("train.max_minutes must be > 0 or null")
        if self.val_every < 1 or self.n_folds < 2:
            raise ConfigError("train.val_every must be >= 1 and train.n_folds >= 2")

    def validation_for(self, fold: int | str) -> str:
        """``validation`` resolved for ``fold``: ``auto`` is ``held_out`` for a fold number and
        ``none`` for ``"all"``."""
        if self.validation == "auto":
            return "none" if fold == "all" else "held_out"
        return self.validation

    @property
    def resolved_split_seed(self) -> int:
        """The seed of the cross-validation split: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window prediction (see ``segmenter.inference.predictor``).

    Attributes:
        overlap: sliding-window overlap fraction (nnU-Net: 0.5).
        tta: mirroring test-time augmentation.
        mirroring: which mirrorings TTA averages: ``all`` (the 8 subsets of the three axes,
            nnU-Net's) or ``single`` (no flip and the three single-axis flips: half the passes).
        threshold: foreground probability threshold of the mask.
        min_lesion_mm3: predicted components smaller than this are removed (mm3).
        sw_batch_size: windows per forward pass.
        window: ``patch`` (the training patch, nnU-Net's) or ``whole``: one window holding the
            whole preprocessed image (the network is fully convolutional; above
            ``WHOLE_WINDOW_MAX_VOXELS`` voxels the patch is used).
    """

    overlap: float = 0.5
    tta: bool = True
    mirroring: Literal["all", "single"] = "all"
    threshold: float = 0.5
    min_lesion_mm3: float = 0.0
    sw_batch_size: int = 2
    window: Literal["patch", "whole"] = "patch"

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"inference.overlap must be in [0, 1), got {self.overlap}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"inference.threshold must be in (0, 1), got {self.threshold}")
        if self.min_lesion_mm3 < 0 or self.sw_batch_size < 1:
            raise ConfigError("inference.min_lesion_mm3 must be >= 0, sw_batch_size >= 1")


@dataclass(frozen=True)
class EvaluationConfig:
    """Lesion-level evaluation (see ``segmenter.evaluation.metrics``).

    Attributes:
        preset: lesion matching rule: ``isles22`` (default), ``atlas``, ``brats23``, ``msseg``,
            ``panoptica``.
        size_bins_mm3: edges of the lesion-size bins for recall by size, in mm3, increasing.
    """

    preset: PresetName = "isles22"
    size_bins_mm3: tuple[float, ...] = (0.0, 10.0, 100.0, 1000.0, float("inf"))

    def __post_init__(self) -> None:
        edges = self.size_bins_mm3
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ConfigError(
                f"evaluation.size_bins_mm3 must be at least two increasing edges, got {edges}"
            )


@dataclass(frozen=True)
class PlanConfig:
    """How ``segmenter plan`` sizes the patch and the network (see ``segmenter.planning.planner``).

    Attributes:
        budget: ``cpu`` or ``gpu``: which patch budget below applies.
        cpu_patch_voxels: voxels per patch on a CPU (default 80^3, batch 2: a training step of
            the default model stays well under a second on 2 cores).
        gpu_patch_voxels: voxels per patch on a GPU (default 128^3, nnU-Net's usual 3D patch).
        batch_size: patches per step (nnU-Net: 2).
        max_depth: most resolution levels (the input level included).
        minutes: training budget the plan sizes the network for: ``plan`` times a training
            step of each width in ``widths`` on this machine and keeps the widest that still
            trains ``min_steps`` steps in the budget (null: no width chosen; the config's
            ``model.base_filters`` stays).
        widths: candidate ``model.base_filters``, timed narrowest first (a wider one is timed
            only while the narrower ones reach ``min_steps``).
        min_steps: steps a budget must allow for a width to be chosen (500: 16 filters at
            320-520 steps matched 8 filters at 2.5-2.8x the steps on BraTS and MS,
            ``configs/experiments/ms_width``).
        overhead: share of the budget not spent in training steps (start-up, data, validation).
        max_spacing_mm: the coarsest spacing the plan coarsens a fine axis to for large
            lesions (null: keep the data's spacing); see ``lesion_voxels``.
        lesion_voxels: voxels the small lesions must still span across once coarsened (4: a
            whole tumour's smaller satellites at 2 mm; MS lesions of a few mm3 keep 1 mm).
        lesion_percentile: which lesions are the small ones: this percentile of the training
            lesions' volumes (those the evaluation preset counts, above its ``min_ref_mm3``).
    """

    budget: Literal["cpu", "gpu"] = "cpu"
    cpu_patch_voxels: int = 80**3
    gpu_patch_voxels: int = 128**3
    batch_size: int = 2
    max_depth: int = 6
    minutes: float | None = None
    widths: tuple[int, ...] = (8, 16, 32)
    min_steps: int = 500
    overhead: float = 0.1
    max_spacing_mm: float | None = 2.0
    lesion_voxels: float = 4.0
    lesion_percentile: float = 10.0

    def __post_init__(self) -> None:
        if min(self.cpu_patch_voxels, self.gpu_patch_voxels) < 8**3:
            raise ConfigError("plan.cpu_patch_voxels and plan.gpu_patch_voxels must be >= 512")
        if self.batch_size < 1:
            raise ConfigError(f"plan.batch_size must be >= 1, got {self.batch_size}")
        if not 2 <= self.max_depth <= 7:
            raise ConfigError(f"plan.max_depth must be in 2..7, got {self.max_depth}")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError("plan.minutes must be > 0 or null")
        if not self.widths or min(self.widths) < 1 or self.min_steps < 1:
            raise ConfigError("plan.widths must be counts >= 1 and plan.min_steps >= 1")
        if not 0.0 <= self.overhead < 1.0:
            raise ConfigError(f"plan.overhead must be in [0, 1), got {self.overhead}")
        if self.max_spacing_mm is not None and not self.max_spacing_mm > 0:
            raise ConfigError(f"plan.max_spacing_mm must be > 0 or null, got {self.max_spacing_mm}")
        if not self.lesion_voxels > 0 or not 0.0 <= self.lesion_percentile <= 100.0:
            raise ConfigError("plan.lesion_voxels must be > 0 and plan.lesion_percentile in 0..100")


@dataclass(frozen=True)
class Config:
    """A whole experiment: ``data``, ``augment``, ``model``, ``loss``, ``train``, ``inference``,
    ``evaluation``, ``plan``."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# --------------------------------------------------------------------------------------------
# Typed construction from plain dicts
# --------------------------------------------------------------------------------------------


#: Most values a YAML text may expand to, an alias counted each time it is used: an alias bomb
#: ("billion laughs") is refused before it is built. A config holds a few hundred at most.
MAX_YAML_VALUES = 100_000

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 6, 6, 80


def _shown(value: Any) -> str:
    """A value for an error message: its repr, cut short when long."""
    return _SHORT.repr(value)


def _expanded_size(root: yaml.Node) -> float:
    """Values in the document ``root`` once every alias is expanded (inf for a cycle)."""
    sizes: dict[int, float] = {}

    def size(node: yaml.Node) -> float:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = math.inf  # an alias back into its own anchor never ends
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        sizes[key] = total
        return total

    return size(root)


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing what would expand past :data:`MAX_YAML_VALUES`
    values (alias bombs, recursive aliases) before building it.

    Args:
        text: the YAML text.
        where: what to name in errors (a file, an override).

    Raises:
        ConfigError: invalid YAML, a tag that would construct an object, or too many values.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise ConfigError(
                f"{where}: YAML expands to more than {MAX_YAML_VALUES} values through its "
                f"aliases (an alias bomb?)"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"{where}: not valid YAML ({first})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's own type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_shown(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            valid = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{where}: {_shown(value)} is not one of: {valid}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_shown(value)}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {_shown(value)}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: expected a mapping of {tp.__name__} keys, got {_shown(value)}"
            )
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "+inf"):
            return float("inf")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {_shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_shown(value)}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")  # programming error


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys"
            f"{' in ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any] | None) -> Config:
    """Build a :class:`Config` from a plain mapping (as ``yaml.safe_load`` returns).

    Raises:
        ConfigError: unknown key (the message lists the valid ones) or a wrongly typed value.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
    return _build(Config, values, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``a.b=value`` overrides; each value is parsed as a YAML scalar and type-checked.

    Raises:
        ConfigError: malformed override, unknown key or a value of the wrong type.
    """
    values: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.gamma=2)")
        value = safe_yaml(raw, f"override {_shown(item)}: value") if raw.strip() else ""
        values.append((key, value))
    return apply_values(cfg, values)


def apply_values(cfg: Config, values: list[tuple[str, Any]] | dict[str, Any]) -> Config:
    """Set dotted keys (``loss.gamma``) to already-parsed values, in order; type-checked.

    Raises:
        ConfigError: unknown section or key (the message lists the valid ones), wrong type.
    """
    data = config_to_dict(cfg)
    items = list(values.items()) if isinstance(values, dict) else list(values)
    for key, value in items:
        node: dict[str, Any] = data
        parts = str(key).split(".")
        walked: list[str] = []
        for part in parts[:-1]:
            walked.append(part)
            child = node.get(part)
            if not isinstance(child, dict):
                valid = ", ".join(k for k, v in node.items() if isinstance(v, dict))
                raise ConfigError(
                    f"unknown config section '{'.'.join(walked)}' in override '{key}'; "
                    f"valid sections: {valid}"
                )
            node = child
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            section = ".".join(parts[:-1]) or "the top level"
            valid = ", ".join(k for k, v in node.items() if not isinstance(v, dict))
            raise ConfigError(
                f"unknown config key '{key}' in override; valid keys in {section}: {valid}"
            )
        node[parts[-1]] = value
    return config_from_dict(data)


def read_yaml(path: Path, kind: str = "config") -> Any:
    """:func:`safe_yaml` of a file, with one-line errors naming it.

    Raises:
        ConfigError: the file is missing, a folder, not UTF-8 text or not valid YAML, or it
            expands past :data:`MAX_YAML_VALUES` values.
    """
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {kind} file")
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a {kind} file (not UTF-8 text: {exc.reason} at byte {exc.start})"
        ) from None
    return safe_yaml(text, str(path))


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a YAML config (defaults for what it leaves out) and apply ``--set`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``a.b=value`` strings, applied in order.

    Raises:
        ConfigError: missing or unparsable file, unknown key, wrong type.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "config")
        try:
            cfg = config_from_dict(loaded)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        values = config_to_dict(cfg)
    cfg = config_from_dict(values)
    return apply_overrides(cfg, overrides) if overrides else cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (every key, defaults included)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config to ``path`` atomically; it loads back to an equal Config."""
    write_text(path, dump_config(cfg))
