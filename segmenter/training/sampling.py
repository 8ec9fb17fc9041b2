"""Random training patches with foreground oversampling, and the DataLoader that serves them.

:class:`PatchDataset` is an endless ``torch.utils.data.IterableDataset`` of single samples; the
DataLoader batches them (each worker builds whole batches). Per sample:

1. a case is chosen uniformly (lesion-free cases included);
2. with probability ``foreground_fraction`` the patch is centred on a foreground voxel:
   ``foreground`` mode draws a lesion voxel uniformly, ``lesion`` mode draws a lesion
   (26-connected component) uniformly and then a voxel in it, so a 5-voxel lesion is centred as
   often as a 5,000-voxel one. A foreground draw on a lesion-free case falls back to a random
   location. Otherwise the patch lies at a uniformly random position;
3. the patch is kept inside the volume where the volume is large enough (a foreground-centred
   patch is shifted inwards near the border, as in nnU-Net); along an axis shorter than the
   patch, the volume is centred and padded with 0 (image and label);
4. augmentation (:mod:`segmenter.training.augmentation`): the spatial transform is drawn
   first and the larger source region it needs is cropped, so rotation brings no empty
   corners except beyond the volume's edge (zeros there, like the background of a z-scored
   case); a thick-slice patch (``augmentation.thick_axis``) is rotated and scaled in-plane
   only.

Foreground voxels are indexed once at construction: per case, one int32/int64 array of flat
voxel indices sorted by lesion, plus lesion offsets (CSR layout; a few bytes per lesion voxel).
Cases stay in memory as numpy arrays; the loader's workers are forked, so they share them
copy-on-write.

Seeding: each iterator draws from ``numpy.random.default_rng([seed, epoch, k, worker])``, with
``worker`` the DataLoader worker id (0 in the main process) and ``k`` the number of iterators
that copy of the dataset has started before. With persistent workers (as :func:`make_loader`
builds them), ``k`` counts epochs; with non-persistent workers call :meth:`set_epoch`. The same
seed and the same ``num_workers`` give the same batches; ``num_workers`` 0 and 1 give the same
stream, other worker counts a different (equally valid) one. The loader draws the seeds torch
gives its workers from its own generator (seeded with ``seed``), never from torch's global RNG,
so making a loader changes nothing else a run draws (dropout, for one) and ``--resume``, which
makes its loaders at other moments than the run it continues, stays exact.

Workers ignore SIGINT and SIGTERM: a stop is the main process's decision (it saves its progress,
then shuts its workers down), and a terminal's Ctrl-C or a batch system's SIGTERM, which reach the
whole process group, must not kill the workers under it.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from segmenter.config import AugmentConfig, DataConfig
from segmenter.evaluation.components import component_sizes, label_components
from segmenter.training.augmentation import (
    apply_intensity,
    apply_spatial,
    sample_spatial,
    source_shape,
    thick_axis,
)

if TYPE_CHECKING:  # same layer: only for annotations
    from segmenter.preprocessing.case import PreprocessedCase


@dataclass(frozen=True)
class LesionIndex:
    """Foreground voxels of one case, grouped by lesion.

    Attributes:
        voxels: flat indices (C order over ``(X, Y, Z)``) of all foreground voxels, the voxels
            of lesion 0 first, then lesion 1, ...
        offsets: ``(n_lesions + 1,)``; lesion ``i`` is ``voxels[offsets[i]:offsets[i + 1]]``.
    """

    voxels: np.ndarray
    offsets: np.ndarray

    @property
    def n_lesions(self) -> int:
        """Number of lesions (connected components)."""
        return len(self.offsets) - 1

    @classmethod
    def build(cls, label: np.ndarray, connectivity: int = 26) -> LesionIndex:
        """Index ``label > 0`` (``(X, Y, Z)``) by connected component."""
        mask = label > 0
        dtype = np.int32 if mask.size < 2**31 else np.int64
        components, n = label_components(mask, connectivity)
        flat = components.reshape(-1)
        fg = np.flatnonzero(flat)
        comp = flat[fg]
        order = np.argsort(comp, kind="stable")
        counts = component_sizes(comp, n)
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        return cls(fg[order].astype(dtype), offsets)


@dataclass(frozen=True)
class Location:
    """Where a patch comes from.

    Attributes:
        case: index into the dataset's cases.
        lo: first voxel of the patch per axis (negative, or past the end, where padded).
        centre: the voxel the patch was drawn around (``lo + patch_size // 2`` unless shifted
            inwards at the border).
        foreground: whether the draw was a foreground draw that found a lesion voxel.
    """

    case: int
    lo: tuple[int, int, int]
    centre: tuple[int, int, int]
    foreground: bool


def _crop_padded(arr: np.ndarray, lo: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``arr[..., lo:lo+size]`` over the last three axes, zeros where it leaves the array."""
    shape = arr.shape[-3:]
    src, dst = [], []
    inside = True
    for a, n, s in zip(lo, size, shape, strict=True):
        a0, a1 = max(a, 0), min(a + n, s)
        inside &= a0 == a and a1 == a + n
        src.append(slice(a0, max(a1, a0)))
        dst.append(slice(a0 - a, max(a1, a0) - a))
    if inside:
        return np.ascontiguousarray(arr[(Ellipsis, *src)])
    out = np.zeros(arr.shape[:-3] + tuple(size), dtype=arr.dtype)
    out[(Ellipsis, *dst)] = arr[(Ellipsis, *src)]
    return out


class PatchDataset(IterableDataset):
    """Endless random patches from preprocessed cases (see the module docstring).

    Each item is ``{"image": (C, X, Y, Z) float32, "label": (1, X, Y, Z) float32}`` tensors,
    the label binary (``label > 0``), the patch ``patch_size``.
    """

    def __init__(
        self,
        cases: Sequence[PreprocessedCase],
        patch_size: Sequence[int],
        *,
        foreground_fraction: float = 0.33,
        sampling: Literal["foreground", "lesion"] = "foreground",
        augment: AugmentConfig | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        """Index the cases' foreground.

        Args:
            cases: labelled cases (``label`` not None), images ``(C, X, Y, Z)``.
            patch_size: ``(X, Y, Z)`` voxels.
            foreground_fraction: probability of a foreground-centred patch, in [0, 1].
            sampling: ``foreground`` (uniform lesion voxel) or ``lesion`` (uniform lesion,
                then uniform voxel in it).
            augment: augmentation settings; None for none.
            seed: base seed of all draws.
            rank: data-parallel rank: each rank > 0 draws its own stream (rank 0 that of one
                process).
        """
        super().__init__()
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive sizes, got {patch_size}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        if sampling not in ("foreground", "lesion"):
            raise ValueError(f"sampling must be 'foreground' or 'lesion', got {sampling!r}")
        channels = {c.image.shape[0] for c in cases}
        if len(channels) != 1:
            raise ValueError(f"cases have different channel counts: {sorted(channels)}")
        for c in cases:
            if c.label is None:
                raise ValueError(f"{c.case_id}: training cases need a label")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.sampling = sampling
        self.augment = augment if augment is not None else AugmentConfig(enabled=False)
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0
        self._iterations = 0
        self.lesions = [LesionIndex.build(c.label) for c in self.cases]  # type: ignore[arg-type]
        #: the thick axis of a thick-slice patch (spatial augmentation stays in-plane), or None
        self.thick_axis = thick_axis(self.patch_size)

    def set_epoch(self, epoch: int) -> None:
        """Mix ``epoch`` into the seed of iterators started after this call (in this process:
        before forking non-persistent workers, or with ``num_workers`` 0)."""
        self.epoch = int(epoch)

    # -------------------------------------------------------------------------- drawing

    def _draw_foreground(self, index: LesionIndex, gen: np.random.Generator) -> int:
        if self.sampling == "lesion":
            k = int(gen.integers(index.n_lesions))
            a, b = int(index.offsets[k]), int(index.offsets[k + 1])
            return int(index.voxels[gen.integers(a, b)])
        return int(index.voxels[gen.integers(len(index.voxels))])

    def sample_location(self, gen: np.random.Generator) -> Location:
        """Draw a case and a patch position (no voxels copied)."""
        case = int(gen.integers(len(self.cases)))
        shape = self.cases[case].image.shape[1:]
        patch = self.patch_size
        want_fg = gen.random() < self.foreground_fraction
        index = self.lesions[case]
        if want_fg and index.n_lesions:
            centre = tuple(
                int(v) for v in np.unravel_index(self._draw_foreground(index, gen), shape)
            )
        else:
            want_fg = False
            centre = tuple(
                int(gen.integers(s - p + 1)) + p // 2 if s >= p else s // 2
                for s, p in zip(shape, patch, strict=True)
            )
        lo = tuple(
            min(max(c - p // 2, 0), s - p) if s >= p else (s - p) // 2
            for c, s, p in zip(centre, shape, patch, strict=True)
        )
        return Location(case, lo, centre, bool(want_fg))  # type: ignore[arg-type]

    def sample(self, gen: np.random.Generator) -> dict[str, torch.Tensor]:
        """Draw one (augmented) patch.

        Returns:
            ``{"image": (C, *patch_size) float32, "label": (1, *patch_size) float32 in {0, 1}}``.
        """
        loc = self.sample_location(gen)
        case = self.cases[loc.case]
        params = sample_spatial(self.augment, gen, in_plane_of=self.thick_axis)
        src = source_shape(params, self.patch_size)
        lo = [a - (s - p) // 2 for a, s, p in zip(loc.lo, src, self.patch_size, strict=True)]
        image = torch.from_numpy(_crop_padded(case.image, lo, src))
        label_np = _crop_padded(case.label, lo, src) > 0  # type: ignore[arg-type]
        label = torch.from_numpy(label_np[None].astype(np.float32))
        image, label = apply_spatial(image, label, params, self.patch_size)
        image = apply_intensity(image, self.augment, gen)
        return {"image": image, "label": label}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        started = self._iterations
        self._iterations += 1
        entropy = [self.seed, self.epoch, started, worker] + ([self.rank] if self.rank else [])
        gen = np.random.default_rng(entropy)
        while True:
            yield self.sample(gen)


def make_dataset(
    cases: Sequence[PreprocessedCase],
    data_cfg: DataConfig,
    aug_cfg: AugmentConfig,
    seed: int,
    rank: int = 0,
) -> PatchDataset:
    """A :class:`PatchDataset` set up from the config sections."""
    return PatchDataset(
        cases,
        data_cfg.patch_size,
        foreground_fraction=data_cfg.foreground_fraction,
        sampling=data_cfg.sampling,
        augment=aug_cfg,
        seed=seed,
        rank=rank,
    )


def make_loader(
    cases: Sequence[PreprocessedCase],
    data_cfg: DataConfig,
    aug_cfg: AugmentConfig,
    seed: int,
    *,
    prefetch_factor: int = 4,
    rank: int = 0,
) -> DataLoader:
    """An endless DataLoader of training batches.

    Use it as one iterator for the whole run (``it = iter(loader)``; ``next(it)`` per step):
    ``len(loader)`` is undefined. Workers (``data_cfg.num_workers``) are forked where the
    platform allows (cases shared copy-on-write), persistent, one torch thread each, and keep
    ``prefetch_factor`` batches each ready; they ignore SIGINT and SIGTERM (the module
    docstring). Pinned memory is off (CPU training).

    Args:
        cases: labelled preprocessed cases.
        data_cfg: patch size, batch size, foreground fraction, sampling mode, workers.
        aug_cfg: augmentation.
        seed: base seed (see the module docstring).
        prefetch_factor: batches each worker keeps ready.
        rank: data-parallel rank (its own stream; ``data_cfg.batch_size`` is then this
            rank's share of the global batch).

    Returns:
        Batches ``{"image": (B, C, X, Y, Z) float32, "label": (B, 1, X, Y, Z) float32}``.
    """
    dataset = make_dataset(cases, data_cfg, aug_cfg, seed, rank)
    workers = data_cfg.num_workers
    extra: dict = {"generator": torch.Generator().manual_seed(seed)}
    if workers > 0:
        extra |= {"persistent_workers": True, "prefetch_factor": prefetch_factor,
                  "worker_init_fn": leave_signals_to_main}  # fmt: skip
        if "fork" in multiprocessing.get_all_start_methods():
            extra["multiprocessing_context"] = multiprocessing.get_context("fork")
    return DataLoader(
        dataset, batch_size=data_cfg.batch_size, num_workers=workers, pin_memory=False, **extra
    )


def leave_signals_to_main(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM (module docstring).

    Args:
        worker_id: the worker's number (unused).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def patch_foreground_rate(dataset: PatchDataset, n: int, seed: int = 0) -> float:
    """Fraction of ``n`` drawn patch locations whose (unaugmented) label patch holds foreground.

    Args:
        dataset: the sampler to measure.
        n: number of draws.
        seed: seed of the draws (independent of the dataset's own seed).

    Returns:
        The rate in [0, 1]. About ``foreground_fraction`` plus what random patches hit.
    """
    gen = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        loc = dataset.sample_location(gen)
        label = dataset.cases[loc.case].label
        hits += bool(_crop_padded(label, loc.lo, dataset.patch_size).any())  # type: ignore[arg-type]
    return hits / n


__all__ = [
    "LesionIndex",
    "Location",
    "PatchDataset",
    "leave_signals_to_main",
    "make_dataset",
    "make_loader",
    "patch_foreground_rate",
]
