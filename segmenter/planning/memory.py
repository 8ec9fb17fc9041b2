"""Peak memory of ``predict`` and ``train``, estimated from the image headers alone.

Before a voxel is read, :func:`check_prediction` and :func:`check_training` estimate the most
RAM the command will hold at once and refuse, with one line naming the file and the figures
(:class:`~segmenter.errors.InputError`, exit 2), what would not fit into
:func:`segmenter.resources.available_memory`, instead of being killed by the OOM killer
halfway. Only headers are read (:func:`segmenter.io.read_info`), so a header claiming a huge
volume over a small payload is refused before anything is allocated.

The estimate leans high where a header cannot tell: the crop to the nonzero box is unknown, so
none is assumed; resampling to the run's target spacing changes the voxel count and is
counted from the header's spacing. Each phase adds up the arrays alive at its peak in the code
that runs it; the estimate is the largest phase plus the allocator's slack (10 % and 64 MB:
:data:`SLACK_FRACTION`, :data:`SLACK_BYTES`) plus what the libraries take on first use
(:data:`PREDICT_RUNTIME_BYTES`, :data:`TRAIN_RUNTIME_BYTES`). Bytes, with ``N`` voxels in the
scan (``X*Y*Z`` of channel 0), ``C`` channels, ``M`` voxels once resampled (``N`` without
resampling), ``K`` output channels, ``P`` voxels per patch (window), ``W`` windows per forward
pass (``inference.sw_batch_size``), ``B`` the batch size, ``F`` the base filters, ``ch`` the
channels as float32 at their files' shapes (``4CN`` for 3D files) and ``dec`` the largest
decoding buffer of one file (its stored bytes, plus ``8`` per voxel for an integer file, which
nibabel scales in float64; ITK formats ``12`` per voxel). ``ch + dec`` is held from the read
on: glibc keeps freed blocks under its mmap threshold (up to 32 MiB) in the heap, so the
resident set does not shrink back after reading.

Prediction, one case (the largest over the models of an ensemble):

- ``read``: ``ch + dec``;
- ``preprocess``: ``ch + dec`` plus, without resampling, ``8CN`` (stacked channels and their
  normalised copy) ``+ 24N`` (:data:`NORMALISE_BYTES_PER_VOXEL`: the nonzero mask, the masked
  values in float64, their percentile copy and clipped copies); with resampling the larger of
  ``4CN + 8N + 8CM`` (the cubic spline's float64 coefficients, the channels resampled and
  stacked) and ``8CM + 24M`` (normalising);
- ``window``: ``ch + dec + 4CM`` (the preprocessed image) + the tensor copy ``4CM`` + the
  sliding-window accumulators ``4M(K+1)`` (weighted sums and weights) ``+ 4KM`` (their
  quotient) + the windows, ``4P`` (importance map) ``+ 4(C+2K)WP`` (windows in and out; with
  TTA ``4(C+3K)WP``, the mirrors' running sum) ``+ WP x``
  :data:`INFERENCE_BYTES_PER_VOXEL` ``+`` :data:`INFERENCE_SCRATCH_BYTES`; with the model on
  an accelerator the tensors and windows live there and the host holds ``4CM`` for the copy;
- ``restore``: ``ch + dec + 4CM + 4KM`` (logits) + the larger of ``4M(K+2)`` (probabilities)
  and ``4M + 4N x (3 resampled, 2 not)`` (resampled back, uncropped, reoriented);
- ``post``: ``ch + dec`` (channel 0 is the output geometry; the rest is heap the allocator
  keeps) ``+ 8N`` (probabilities) ``+ 8N`` (threshold, components, mask);
- an ensemble holds the running sum of probabilities (``4N``) in every phase.

A folder is read one case ahead (:class:`segmenter.inference.predict.ReadAhead`): each case's
estimate adds the next case's ``ch + dec``, read while it is predicted.

Training, all cases (``data.cache_dir`` empty: every preprocessed case is held in RAM):

- the resident dataset: ``(4C + 1) M`` per case (float32 image, uint8 label); none with
  ``data.cache_dir``, whose cases are memory-mapped page cache the kernel can reclaim;
- ``preprocess``: the resident dataset + the :data:`PREPROCESS_THREADS` largest cases'
  preprocessing (``read`` and ``preprocess`` as above, plus the label: its stored bytes and
  uint8 copy, a crop copy ``N`` and, resampled, its one-hot passes ``5N + 6M``); cases already
  in the cache are not preprocessed again;
- ``train``: the resident dataset + ``4 sum M_val`` (the best validation's probabilities,
  kept) + the loaders (two epochs' at once, each worker holding :data:`LOADER_BATCHES`
  batches of ``4(C+1)BP`` and augmenting one patch, :data:`AUGMENT_BYTES_PER_VOXEL` ``x P``)
  + ``16`` bytes per parameter (weights, gradients, two AdamW moments; 12 with SGD) + the
  larger of a step, ``BP x`` :data:`TRAINING_BYTES_PER_VOXEL` ``+``
  :data:`TRAINING_SCRATCH_BYTES`, and a validation: the largest validation case's ``window``
  tensors (no TTA; its image is resident already) ``+ 4 sum M_val`` (the new probabilities).
  The validation cases (``train.validation``) are the ``ceil(n / n_folds)`` largest for
  ``held_out``, all the others for ``training`` (every case with ``--fold all``), none for
  ``none`` (``--fold all``'s default).
  Training on an accelerator keeps the weights, the step and the windows there.

Left out: the forked loader workers' own interpreters, the writers' buffers and the GPU's own
memory (only the host's RAM is checked).

Measured on 2 EPYC cores (torch 2.13 CPU), the resident set's growth from the check to the end
of the command against the estimate: ``segmenter predict`` of a 2-channel 64^3 phantom with
the tests' tiny run, 191-197 MB against 244 MB without TTA and 196 MB against 248 MB with it
(``tests/planning/test_memory.py`` keeps this within 1-3x); ``segmenter train`` of the tiny
config, 218 MB against 385 MB, and of 64^3 patches with 8 base filters, 376-569 MB against
835 MB. The live arrays alone against a warm prediction's peak (no TTA): 113 MB against
118 MB at 128^3, 314 MB against 315 MB at 182^3, where the preprocessing peaks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from segmenter import resources
from segmenter.config import Config
from segmenter.data.layout import Case, Dataset
from segmenter.errors import InputError
from segmenter.io import NIFTI_SUFFIXES, ImageInfo, read_info, suffix_of
from segmenter.planning.run_plan import RunPlan
from segmenter.preprocessing.cache import is_cached
from segmenter.preprocessing.resampling import new_shape
from segmenter.preprocessing.spec import PreprocessingSpec

#: float32 bytes.
F32 = 4
#: Bytes per voxel that z-scoring one channel holds besides its input and output (the nonzero
#: mask and its complement, the masked values in float64, their percentile copy and clipped
#: copies): 40 bytes per voxel over the read were measured for preprocessing 2-channel 128^3 and
#: 182^3 phantoms, of which ``8CN = 16`` are the stacked and the normalised channels.
NORMALISE_BYTES_PER_VOXEL = 24
#: Host bytes per window voxel of one no-grad forward pass, ``(fixed, per base filter)``.
#: Measured on 2 EPYC cores (torch 2.13 CPU, float32, channels-last as ``UNet3d.place`` puts
#: it, the default convs): the resident set grew by 131-963, 249-342, 510 and 1140 bytes per
#: voxel at 4, 8, 16 and 32 base filters (patches 32^3 to 128^3, 1-2 windows, depth 3-5) after a
#: warm-up and ``malloc_trim``, its peak read as ``VmHWM`` after a reset through
#: ``/proc/self/clear_refs``. ``24 + 34 F`` plus :data:`INFERENCE_SCRATCH_BYTES` bounds them all.
INFERENCE_BYTES_PER_VOXEL = (24, 34)
#: Fixed bytes of a forward pass on the CPU: one 32^3 window with 4 filters took 30 MB (a
#: second window only 8 MB more), the convolution's scratch buffers.
INFERENCE_SCRATCH_BYTES = 32_000_000
#: Bytes per patch voxel of one training step (forward, focal+Dice loss, backward, AdamW),
#: ``(fixed, per base filter)``, measured as :data:`INFERENCE_BYTES_PER_VOXEL`: 317-2610,
#: 539-1068, 979 and 1971 bytes per voxel at 4, 8, 16 and 32 base filters (the most at batch 1
#: on small patches); ``200 + 72 F`` plus :data:`TRAINING_SCRATCH_BYTES` bounds them all.
TRAINING_BYTES_PER_VOXEL = (200, 72)
#: Fixed bytes of a CPU training step: 82 MB for one 32^3 patch with 4 filters.
TRAINING_SCRATCH_BYTES = 80_000_000
#: Batches a loader worker holds: ``sampling.make_loader``'s prefetch factor (4) + one built.
LOADER_BATCHES = 5
#: Bytes per patch voxel a worker needs to augment one patch (coordinates, interpolation).
AUGMENT_BYTES_PER_VOXEL = 64
#: Threads ``training.loop`` preprocesses the dataset with.
PREPROCESS_THREADS = 2
#: What the resident set holds beyond the live arrays, as a fraction of them and a fixed
#: amount: freed blocks glibc keeps in its heap and per-thread arenas. The live estimate came
#: within 4 % under the measured peak at 128^3 and 182^3 (no TTA); at 64^3 the peak was up to
#: 26 MB (no TTA) and 50 MB (TTA) above it.
SLACK_FRACTION = 0.10
SLACK_BYTES = 64_000_000
#: What ``predict`` takes on first use besides its arrays (oneDNN's kernels, the writers): a
#: cold prediction of a 64^3 phantom grew by 75-80 MB more than a warm one when it still
#: imported MONAI's inferers; without them the whole cold prediction grew by 66 MB.
PREDICT_RUNTIME_BYTES = 64_000_000
#: The same for ``train`` (matplotlib for the curves as well): a cold tiny training run grew by
#: 216 MB, a warm one by 57 MB.
TRAIN_RUNTIME_BYTES = 192_000_000
#: Host bytes per parameter of CPU training: weights, gradients and the optimiser's moments.
OPTIMISER_BYTES_PER_PARAMETER = {"adamw": 16, "sgd": 12}


def _spatial(shape: Sequence[int]) -> tuple[int, int, int]:
    dims = (*(int(n) for n in shape[:3]), 1, 1, 1)
    return (dims[0], dims[1], dims[2])


def _decode_extra(info: ImageInfo) -> int:
    """``dec`` of one file: bytes beyond its float32 copy while it is decoded."""
    voxels = math.prod(int(n) for n in info.shape)
    if suffix_of(info.path) not in NIFTI_SUFFIXES or info.dtype is None:
        return 3 * F32 * voxels  # SimpleITK's image, its numpy copy and the axis transpose
    dtype = np.dtype(info.dtype)
    scaled = 8 if dtype.kind in "iub" else 0  # nibabel applies a scaling in float64
    return voxels * (dtype.itemsize + scaled)  # + the stored bytes read from the gzip stream


def _stored_bytes(info: ImageInfo) -> int:
    itemsize = np.dtype(info.dtype).itemsize if info.dtype is not None else F32
    return math.prod(int(n) for n in info.shape) * itemsize


@dataclass(frozen=True)
class Volume:
    """One case's geometry, from its headers.

    Attributes:
        path: the file (channel or label) whose header claims the most voxels, the one
            messages name.
        shape: that file's header shape (every dimension).
        grid: channel 0's ``(X, Y, Z)``.
        spacing: channel 0's voxel size in mm.
        channels: number of channel files, ``C``.
        channel_bytes: ``ch``, the channels as float32 at their files' shapes.
        decode_bytes: ``dec``, the largest decoding buffer of one file.
        label_bytes: the label's stored bytes plus its uint8 copy, 0 without a label.
    """

    path: Path
    shape: tuple[int, ...]
    grid: tuple[int, int, int]
    spacing: tuple[float, float, float]
    channels: int
    channel_bytes: int
    decode_bytes: int
    label_bytes: int = 0

    @classmethod
    def from_headers(cls, infos: Sequence[ImageInfo], label: ImageInfo | None = None) -> Volume:
        """The volume of a case's channel headers (channel 0 first) and label header."""
        biggest = max([*infos, *([label] if label else [])], key=lambda i: math.prod(i.shape))
        stored = sum(math.prod(int(n) for n in i.shape) for i in infos)
        label_bytes = 0
        if label is not None:
            label_bytes = _stored_bytes(label) + math.prod(int(n) for n in label.shape)
        return cls(
            path=biggest.path, shape=tuple(int(n) for n in biggest.shape),
            grid=_spatial(infos[0].shape), spacing=infos[0].spacing, channels=len(infos),
            channel_bytes=F32 * stored, decode_bytes=max(_decode_extra(i) for i in infos),
            label_bytes=label_bytes,
        )  # fmt: skip

    @property
    def voxels(self) -> int:
        """``N``: ``X*Y*Z`` of channel 0."""
        return math.prod(self.grid)

    @property
    def held_bytes(self) -> int:
        """``ch + dec``: what reading the channels leaves resident."""
        return self.channel_bytes + self.decode_bytes

    def resampled_voxels(self, target_spacing: Sequence[float] | None) -> int:
        """``M``: the voxel count at ``target_spacing`` (no crop), ``N`` when None."""
        if target_spacing is None:
            return self.voxels
        try:
            return math.prod(new_shape(self.grid, self.spacing, target_spacing))
        except ValueError:  # a bad spacing in the header: reading it fails with its own message
            return self.voxels

    def describe(self) -> str:
        """``2400x2400x900 voxels, 4 channels``."""
        plural = "s" if self.channels != 1 else ""
        return f"{'x'.join(str(n) for n in self.shape)} voxels, {self.channels} channel{plural}"


@dataclass(frozen=True)
class InferenceSetting:
    """What the estimate needs to know of one model's sliding window.

    Attributes:
        target_spacing: the run's resampling target in mm, or None.
        patch_size: the window (voxels).
        out_channels: ``K``, logits channels.
        sw_batch_size: ``W``, windows per forward pass.
        tta: mirroring test-time augmentation on.
        base_filters: ``F``, the network's first-level filters.
        on_accelerator: the model runs on a GPU (its tensors live there, not in RAM).
    """

    target_spacing: tuple[float, ...] | None
    patch_size: tuple[int, int, int]
    out_channels: int
    sw_batch_size: int
    tta: bool
    base_filters: int
    on_accelerator: bool = False

    @classmethod
    def of_run(
        cls, plan: RunPlan, cfg: Config, *, tta: bool | None, on_accelerator: bool
    ) -> InferenceSetting:
        """The setting of a run (its plan and config); ``tta`` None keeps the run's."""
        return cls(
            target_spacing=plan.preprocessing.target_spacing, patch_size=plan.patch_size,
            out_channels=plan.out_channels, sw_batch_size=cfg.inference.sw_batch_size,
            tta=cfg.inference.tta if tta is None else tta, base_filters=cfg.model.base_filters,
            on_accelerator=on_accelerator,
        )  # fmt: skip

    @classmethod
    def of_config(cls, cfg: Config, out_channels: int, *, on_accelerator: bool) -> InferenceSetting:
        """Training's validation: the config's window, without TTA."""
        p = cfg.data.patch_size
        return cls(
            target_spacing=cfg.data.target_spacing, patch_size=(p[0], p[1], p[2]),
            out_channels=out_channels, sw_batch_size=cfg.inference.sw_batch_size, tta=False,
            base_filters=cfg.model.base_filters, on_accelerator=on_accelerator,
        )  # fmt: skip


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of the live arrays per phase; the estimate is the largest plus the
    allocator's slack (:data:`SLACK_FRACTION`, :data:`SLACK_BYTES`) and the libraries' first
    use (``runtime``: :data:`PREDICT_RUNTIME_BYTES`, :data:`TRAIN_RUNTIME_BYTES`)."""

    phases: Mapping[str, int]
    runtime: int = 0

    @property
    def live(self) -> int:
        """The largest phase, in bytes."""
        return max(self.phases.values())

    @property
    def total(self) -> int:
        """The estimated peak growth of the resident set, in bytes: the live peak, the
        allocator's slack and ``runtime`` (what the libraries take on first use)."""
        return int(self.live * (1 + SLACK_FRACTION)) + SLACK_BYTES + self.runtime

    @property
    def phase(self) -> str:
        """The phase that peaks."""
        return max(self.phases, key=lambda k: self.phases[k])


def _activations(per_voxel: tuple[int, int], voxels: int, base_filters: int) -> int:
    return voxels * (per_voxel[0] + per_voxel[1] * base_filters)


def _preprocess_bytes(volume: Volume, m: int) -> int:
    """The ``preprocess`` phase without ``ch + dec``: resampling, then normalising."""
    c, n = volume.channels, volume.voxels
    if m == n:
        return 2 * F32 * c * n + NORMALISE_BYTES_PER_VOXEL * n
    resample = F32 * c * n + 8 * n + 2 * F32 * c * m
    return max(resample, 2 * F32 * c * m + NORMALISE_BYTES_PER_VOXEL * m)


def _window_bytes(channels: int, run: InferenceSetting, m: int) -> int:
    """Host bytes of the ``window`` phase's tensors (not the preprocessed image itself)."""
    c, k, p, w = channels, run.out_channels, math.prod(run.patch_size), run.sw_batch_size
    if run.on_accelerator:
        return F32 * c * m
    # the sums and weights of the windows, then their quotient; mirroring flips windows, not
    # the volume, so it only adds a window-sized running sum
    accumulators = F32 * m * (k + 1) + F32 * k * m
    windows = F32 * p + F32 * (c + (3 if run.tta else 2) * k) * w * p + INFERENCE_SCRATCH_BYTES
    windows += _activations(INFERENCE_BYTES_PER_VOXEL, w * p, run.base_filters)
    return F32 * c * m + accumulators + windows


def _restore_bytes(volume: Volume, run: InferenceSetting, m: int) -> int:
    """The ``restore`` phase without ``ch + dec``."""
    c, k, n = volume.channels, run.out_channels, volume.voxels
    back = F32 * m + F32 * n * (3 if m != n else 2)
    return F32 * c * m + F32 * k * m + max(F32 * m * (k + 2), back)


def prediction_estimate(volume: Volume, runs: Sequence[InferenceSetting]) -> MemoryEstimate:
    """Peak host bytes of predicting one case with ``runs`` (see the module docstring).

    Args:
        volume: the case's headers.
        runs: one setting per model of the ensemble (at least one).
    """
    n, c = volume.voxels, volume.channels
    held = volume.held_bytes + (F32 * n if len(runs) > 1 else 0)
    phases = {"read": held, "post": held + 16 * n}
    for run in runs:
        m = volume.resampled_voxels(run.target_spacing)
        for name, value in (
            ("preprocess", _preprocess_bytes(volume, m)),
            ("window", F32 * c * m + _window_bytes(c, run, m)),
            ("restore", _restore_bytes(volume, run, m)),
        ):  # fmt: skip
            phases[name] = max(phases.get(name, 0), held + value)
    return MemoryEstimate(phases, runtime=PREDICT_RUNTIME_BYTES)


def _case_preprocess_bytes(volume: Volume, m: int) -> int:
    """Peak bytes of preprocessing one labelled training case (``read`` and ``preprocess``
    with the label's copies)."""
    n = volume.voxels
    label = volume.label_bytes + n + (5 * n + 6 * m if m != n else 0)
    return volume.held_bytes + label + _preprocess_bytes(volume, m)


def _loader_bytes(cfg: Config, channels: int) -> int:
    """The patch loaders' batches and augmentation (see the module docstring)."""
    d = cfg.data
    p = math.prod(d.patch_size)
    batch = F32 * (channels + 1) * d.batch_size * p
    augment = AUGMENT_BYTES_PER_VOXEL * p
    if d.num_workers == 0:
        return batch + augment
    return 2 * d.num_workers * (LOADER_BATCHES * batch + augment)


def _step_bytes(cfg: Config, on_accelerator: bool) -> int:
    """Host bytes of one training step's activations (none on an accelerator)."""
    if on_accelerator:
        return 0
    voxels = cfg.data.batch_size * math.prod(cfg.data.patch_size)
    step = _activations(TRAINING_BYTES_PER_VOXEL, voxels, cfg.model.base_filters)
    return step + TRAINING_SCRATCH_BYTES


def _optimiser_bytes(cfg: Config, parameters: int, on_accelerator: bool) -> int:
    """Host bytes of the weights, gradients and optimiser state (none on an accelerator)."""
    per_parameter = OPTIMISER_BYTES_PER_PARAMETER.get(cfg.train.optimizer, 16)
    return 0 if on_accelerator else per_parameter * parameters


@dataclass(frozen=True)
class TrainingJob:
    """What the training estimate needs besides the cases' headers.

    Attributes:
        cfg: the run's config (patch, batch, workers, cache, model, optimiser, folds).
        fold: the fold trained, or ``"all"`` (every case is validated).
        parameters: the network's parameter count.
        out_channels: logits channels (1 sigmoid, 2 softmax).
        on_accelerator: training runs on a GPU (activations and weights live there).
        cached: per case, whether ``data.cache_dir`` holds it already (not preprocessed again).
    """

    cfg: Config
    fold: int | str
    parameters: int
    out_channels: int
    on_accelerator: bool = False
    cached: tuple[bool, ...] = ()


def training_estimate(volumes: Sequence[Volume], job: TrainingJob) -> MemoryEstimate:
    """Peak host bytes of training on ``volumes`` (labelled headers; module docstring)."""
    cfg, c = job.cfg, max(v.channels for v in volumes)
    ms = [v.resampled_voxels(cfg.data.target_spacing) for v in volumes]
    resident = 0 if cfg.data.cache_dir else sum((F32 * c + 1) * m for m in ms)
    cached = job.cached or (False,) * len(volumes)
    pairs = zip(volumes, ms, cached, strict=True)
    prep = sorted((0 if hit else _case_preprocess_bytes(v, m) for v, m, hit in pairs), reverse=True)
    held_out = 0 if job.fold == "all" else math.ceil(len(ms) / cfg.train.n_folds)
    n_val = {"none": 0, "held_out": held_out, "training": len(ms) - held_out}[
        cfg.train.validation_for(job.fold)
    ]
    val_ms = sorted(ms, reverse=True)[:n_val]
    probs = F32 * sum(val_ms)
    run = InferenceSetting.of_config(cfg, job.out_channels, on_accelerator=job.on_accelerator)
    validate = _window_bytes(c, run, val_ms[0]) + probs if val_ms else 0
    step = _step_bytes(cfg, job.on_accelerator)
    held = resident + probs + _loader_bytes(cfg, c)
    train = held + _optimiser_bytes(cfg, job.parameters, job.on_accelerator) + max(step, validate)
    preprocess = resident + sum(prep[:PREPROCESS_THREADS])
    return MemoryEstimate({"preprocess": preprocess, "train": train}, runtime=TRAIN_RUNTIME_BYTES)


def _available(available: int | None) -> int | None:
    return resources.available_memory() if available is None else available


def _refusal(path: Path | str, needs: int, what: str, available: int, advice: str) -> InputError:
    return InputError(
        f"{path}: needs about {resources.format_bytes(needs)} to {what}, "
        f"{resources.format_bytes(available)} available; {advice}"
    )


def case_volume(case: Case, *, with_label: bool = False) -> Volume:
    """The :class:`Volume` of a case's headers (no voxel is read).

    Raises:
        InputError: a missing or unreadable file (one line naming it).
    """
    label = read_info(case.label) if with_label and case.label is not None else None
    return Volume.from_headers([read_info(p) for p in case.images], label)


def check_prediction(
    cases: Sequence[Case], runs: Sequence[InferenceSetting], *, available: int | None = None
) -> None:
    """Refuse, before any case is read, a case whose prediction (with the next case's channels
    read meanwhile, see the module docstring) would not fit in memory.

    Args:
        cases: the cases to predict (only their headers are read).
        runs: one setting per model of the ensemble.
        available: bytes available; None reads :func:`segmenter.resources.available_memory`
            (no check when that is unknown).

    Raises:
        InputError: ``scan.nii.gz: needs about 38.2 GB to predict (2400x2400x900 voxels,
            4 channels), 21.5 GB available; ...``, or an unreadable header.
    """
    volumes = [case_volume(c) for c in cases]
    limit = _available(available)
    if limit is None:
        return
    for i, volume in enumerate(volumes):
        ahead = volumes[i + 1].held_bytes if i + 1 < len(volumes) else 0  # read meanwhile
        needs = prediction_estimate(volume, runs).total + ahead
        if needs > limit:
            raise _refusal(
                volume.path, needs, f"predict ({volume.describe()})", limit,
                "crop or resample the scan, or use a machine with more memory",
            )  # fmt: skip


def check_training(dataset: Dataset, job: TrainingJob, *, available: int | None = None) -> None:
    """Refuse, before any case is read, a training run that would not fit in memory.

    The case is named when preprocessing it alone would not fit; otherwise the dataset is.

    Args:
        dataset: the training dataset (only its headers are read).
        job: the run's settings; its ``cached`` is filled in here from ``data.cache_dir``.
        available: bytes available; None reads :func:`segmenter.resources.available_memory`
            (no check when that is unknown).

    Raises:
        InputError: one line with the figures and what to change, or an unreadable header.
    """
    volumes = [case_volume(c, with_label=True) for c in dataset.training]
    limit = _available(available)
    if limit is None or not volumes:
        return
    cfg = job.cfg
    spec = PreprocessingSpec.from_data(cfg.data)
    cache = cfg.data.cache_dir
    cached = tuple(bool(cache) and is_cached(c, cache, spec) for c in dataset.training)
    needs = training_estimate(volumes, replace(job, cached=cached)).total
    if needs <= limit:
        return
    alone = [
        (_case_preprocess_bytes(v, v.resampled_voxels(cfg.data.target_spacing)), v)
        for v, hit in zip(volumes, cached, strict=True)
        if not hit
    ]
    worst, volume = max(alone, key=lambda pair: pair[0], default=(0, volumes[0]))
    if worst > limit:
        case_needs = MemoryEstimate({"preprocess": worst}, runtime=TRAIN_RUNTIME_BYTES).total
        raise _refusal(
            volume.path, case_needs, f"preprocess for training ({volume.describe()})", limit,
            "crop or resample the scan, or use a machine with more memory",
        )  # fmt: skip
    raise _refusal(dataset.root, needs, _training_what(volumes, cfg), limit, _advice(cfg))


def _training_what(volumes: Sequence[Volume], cfg: Config) -> str:
    largest = max(volumes, key=lambda v: v.voxels)
    patch = "x".join(str(n) for n in cfg.data.patch_size)
    return (
        f"train ({len(volumes)} cases, the largest {'x'.join(str(n) for n in largest.grid)} "
        f"voxels; patch {patch}, batch {cfg.data.batch_size})"
    )


def _advice(cfg: Config) -> str:
    cache = "" if cfg.data.cache_dir else "set data.cache_dir (cases memory-mapped, not held), "
    return f"{cache}lower data.patch_size or data.batch_size, or use a machine with more memory"


__all__ = [
    "INFERENCE_BYTES_PER_VOXEL",
    "TRAINING_BYTES_PER_VOXEL",
    "InferenceSetting",
    "MemoryEstimate",
    "TrainingJob",
    "Volume",
    "case_volume",
    "check_prediction",
    "check_training",
    "prediction_estimate",
    "training_estimate",
]
