"""Synthetic MRI-like head phantoms with lesions, written in the nnU-Net v2 raw dataset layout.

Used by ``segmenter synth``, the demo and the tests. A phantom is a head (scalp, skull, CSF,
folded cortex, white matter, deep grey matter, lateral ventricles, interhemispheric fissure)
built from smooth random level sets with partial-volume edges, imaged in one to six contrasts
(FLAIR, T1, T2, T1ce, PD, DWI) with a smooth multiplicative bias field, Rician noise and an
arbitrary intensity scale. Lesions are irregular blobs (unions of ellipsoids perturbed by
smoothed noise), mostly in white matter, many small and few large (log-normal radii), with a
per-lesion contrast: hyperintense on FLAIR (some faint), hypointense on T1.

Geometry: ``size`` voxels along the finest-spacing axis and a cubic field of view of
``size * min(spacing)`` mm, so a coarser axis gets proportionally fewer voxels (thick slices,
as acquired). The affine maps the volume centre near world (0, 0, 0); ``oblique`` adds a
rotation of 5-20 degrees about each axis. Voxel data never depend on ``oblique``.

Determinism: everything is drawn from ``numpy.random.Generator`` objects derived from the seed
(no global state). Geometry, anatomy, lesions and each channel's imaging have their own streams,
so ``oblique`` changes only the affine and channel ``c`` is the same whatever ``channels`` is.
In a dataset, case ``k`` is seeded from ``(seed, split, k)`` and is the same whatever the number
of cases. nibabel (>= 5) writes gzip with mtime 0 and no file name, so the same seed gives
byte-identical files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit
from tqdm import tqdm

from segmenter.atomic import write_text
from segmenter.errors import InputError
from segmenter.io import write_image
from segmenter.rotation import rotation_matrix

#: Contrast names, in channel order.
CONTRASTS: tuple[str, ...] = ("FLAIR", "T1", "T2", "T1ce", "PD", "DWI")

#: Hard tissue classes of :attr:`Phantom.tissues`.
TISSUE_CLASSES: dict[str, int] = {
    "background": 0,
    "scalp": 1,
    "skull": 2,
    "csf": 3,
    "gm": 4,
    "wm": 5,
    "deep_gm": 6,
    "ventricle": 7,
}

# Tissue intensity per contrast (rows: CONTRASTS), columns: air, scalp, skull, CSF, GM, WM, deep GM.
_TISSUE_INTENSITY = np.array(
    [
        [0.0, 0.70, 0.06, 0.08, 0.60, 0.45, 0.52],  # FLAIR: CSF suppressed, GM > WM
        [0.0, 0.90, 0.08, 0.18, 0.48, 0.72, 0.56],  # T1: WM > GM > CSF
        [0.0, 0.55, 0.05, 1.00, 0.62, 0.42, 0.50],  # T2: CSF bright
        [0.0, 0.90, 0.08, 0.20, 0.50, 0.72, 0.58],  # T1ce
        [0.0, 0.75, 0.08, 0.85, 0.80, 0.65, 0.72],  # PD
        [0.0, 0.15, 0.03, 0.12, 0.55, 0.50, 0.52],  # DWI (b1000)
    ],
    dtype=np.float32,
)
_AIR, _SCALP, _SKULL, _CSF, _GM, _WM, _DGM = range(7)

_MIN_AXIS_VOXELS = 8
_DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate; validated on construction (ValueError).

    Attributes:
        size: voxels along the finest-spacing axis (>= 16); the field of view is a cube of
            ``size * min(spacing)`` mm, so coarser axes get proportionally fewer voxels.
        channels: number of contrasts, 1 to 6, in the order of :data:`CONTRASTS`
            (FLAIR, T1, T2, T1ce, PD, DWI).
        spacing: voxel size in mm along ``i, j, k``.
        oblique: rotate the affine by 5-20 degrees about each axis (voxels unchanged).
        lesion_free_fraction: probability that a case has no lesion.
        lesion_fraction: ``(low, high)`` bounds on the lesion voxel fraction of a lesion case;
            each case draws a log-uniform target inside them.
        max_lesion_radius: largest nominal lesion radius in voxels of the finest axis; None means
            ``max(3, 10 * size / 64)``.
        noise: ``(low, high)`` range of the Rician noise level, relative to white matter.
        bias: strength of the smooth multiplicative bias field (std of its log, about).
    """

    size: int = 64
    channels: int = 2
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    oblique: bool = False
    lesion_free_fraction: float = 0.15
    lesion_fraction: tuple[float, float] = (0.0005, 0.01)
    max_lesion_radius: float | None = None
    noise: tuple[float, float] = (0.02, 0.05)
    bias: float = 0.15

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int | np.integer):
            raise ValueError(f"size must be an integer, got {self.size!r}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16 voxels, got {self.size}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int | np.integer):
            raise ValueError(f"channels must be an integer, got {self.channels!r}")
        if not 1 <= self.channels <= len(CONTRASTS):
            raise ValueError(
                f"channels must be between 1 and {len(CONTRASTS)} ({', '.join(CONTRASTS)}), "
                f"got {self.channels}"
            )
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be three positive mm values, got {self.spacing!r}")
        object.__setattr__(self, "spacing", spacing)
        shape = self.shape
        if min(shape) < _MIN_AXIS_VOXELS:
            raise ValueError(
                f"spacing {spacing} with size {self.size} gives shape {shape}; every axis needs "
                f">= {_MIN_AXIS_VOXELS} voxels (increase size or reduce the anisotropy)"
            )
        if not 0.0 <= self.lesion_free_fraction <= 1.0:
            raise ValueError(
                f"lesion_free_fraction must be in [0, 1], got {self.lesion_free_fraction}"
            )
        lo, hi = (float(v) for v in self.lesion_fraction)
        if not 0.0 < lo < hi <= 0.05:
            raise ValueError(
                f"lesion_fraction must be (low, high) with 0 < low < high <= 0.05, "
                f"got {self.lesion_fraction!r}"
            )
        object.__setattr__(self, "lesion_fraction", (lo, hi))
        if self.max_lesion_radius is not None and not self.max_lesion_radius >= 1.0:
            raise ValueError(f"max_lesion_radius must be >= 1 voxel, got {self.max_lesion_radius}")
        nlo, nhi = (float(v) for v in self.noise)
        if not 0.0 <= nlo <= nhi < 0.5:
            raise ValueError(
                f"noise must be (low, high) with 0 <= low <= high < 0.5, got {self.noise!r}"
            )
        object.__setattr__(self, "noise", (nlo, nhi))
        if not 0.0 <= self.bias <= 1.0:
            raise ValueError(f"bias must be in [0, 1], got {self.bias}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(i, j, k)``: ``size`` along the finest axis, fewer along coarser ones."""
        finest = min(self.spacing)
        i, j, k = (max(1, round(self.size * finest / s)) for s in self.spacing)
        return (i, j, k)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Contrast name of each channel."""
        return CONTRASTS[: self.channels]


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic case.

    Attributes:
        images: one ``(i, j, k)`` float32 array per channel, finite, arbitrary positive scale.
        label: ``(i, j, k)`` uint8 lesion mask, values {0, 1}.
        tissues: ``(i, j, k)`` uint8 hard tissue classes (:data:`TISSUE_CLASSES`), without
            lesions.
        affine: 4x4 float64 voxel-to-RAS+ (mm) matrix.
        spacing: voxel size in mm along ``i, j, k``.
        channel_names: contrast of each image.
        lesion_radii: nominal radius in mm of each placed lesion blob.
    """

    images: tuple[np.ndarray, ...]
    label: np.ndarray
    tissues: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    channel_names: tuple[str, ...]
    lesion_radii: tuple[float, ...] = field(default=())

    @property
    def lesion_free(self) -> bool:
        """Whether the case has no lesion voxel."""
        return not bool(self.label.any())

    @property
    def lesion_fraction(self) -> float:
        """Fraction of voxels labelled lesion."""
        return float(np.count_nonzero(self.label)) / self.label.size


# ----------------------------------------------------------------------------------- seeding


def _split_key(test: bool) -> int:
    return 1 if test else 0


def case_seed(seed: int, index: int, *, test: bool = False) -> np.random.SeedSequence:
    """The seed sequence of case ``index`` of a dataset (independent of the number of cases).

    Args:
        seed: dataset seed, a non-negative integer.
        index: case index within its split, >= 0.
        test: the test split (imagesTs) instead of the training split.
    """
    return np.random.SeedSequence(int(seed), spawn_key=(_split_key(test), int(index)))


def case_is_lesion_free(seed: int, index: int, fraction: float, *, test: bool = False) -> bool:
    """Whether case ``index`` of a dataset is lesion-free.

    A low-discrepancy pattern with a seeded phase: any first ``n`` cases hold
    ``floor(n * fraction)`` or ``ceil(n * fraction)`` lesion-free cases, and case ``index`` does
    not depend on the number of cases.
    """
    state = np.random.SeedSequence(int(seed), spawn_key=(2, _split_key(test))).generate_state(1)
    phase = float(state[0]) / 2.0**32
    return math.floor((index + 1) * fraction + phase) > math.floor(index * fraction + phase)


def _children(seed: int | np.random.SeedSequence | np.random.Generator, n: int) -> list:
    if isinstance(seed, np.random.Generator):
        return seed.spawn(n)
    if isinstance(seed, np.random.SeedSequence):
        # derive the children without seed.spawn(), which would advance the sequence
        return [
            np.random.default_rng(
                np.random.SeedSequence(
                    seed.entropy, spawn_key=(*seed.spawn_key, i), pool_size=seed.pool_size
                )
            )
            for i in range(n)
        ]
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or a Generator, got {seed!r}")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


# ------------------------------------------------------------------------------ random fields


class _Grid:
    """Normalised physical coordinates of the voxel grid: about [-1, 1] along every axis."""

    def __init__(self, spec: PhantomSpec) -> None:
        self.shape = spec.shape
        finest = min(spec.spacing)
        # physical step per voxel in units of the finest voxel
        self.step = tuple(s / finest for s in spec.spacing)
        half = spec.size / 2.0
        self.axes = [
            ((np.arange(n) - (n - 1) / 2.0) * st / half).astype(np.float32)
            for n, st in zip(self.shape, self.step, strict=True)
        ]
        self.x = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.z = self.axes[2][None, None, :]
        self.voxel = 2.0 / spec.size  # one finest voxel in normalised units

    def smooth_field(self, rng: np.random.Generator, n_ctrl: int) -> np.ndarray:
        """Smooth Gaussian random field, unit variance everywhere, correlation ~ 2 / n_ctrl.

        A sum of separable Gaussian bumps on an ``n_ctrl``^3 control grid with random weights;
        each axis's basis is row-normalised so the pointwise variance is exactly one.
        """
        ctrl = np.linspace(-1.15, 1.15, n_ctrl)
        sigma = 0.9 * (ctrl[1] - ctrl[0])
        bases = []
        for a in self.axes:
            w = np.exp(-0.5 * ((a[:, None].astype(np.float64) - ctrl[None, :]) / sigma) ** 2)
            bases.append(w / np.sqrt((w**2).sum(axis=1, keepdims=True)))
        coef = rng.standard_normal((n_ctrl, n_ctrl, n_ctrl))
        out = np.tensordot(bases[0], coef, axes=(1, 0))  # (i, c, c)
        out = np.einsum("bj,ajk->abk", bases[1], out)  # (i, j, c)
        out = out @ bases[2].T  # (i, j, k)
        return out.astype(np.float32)

    def ellipsoid(
        self, centre: np.ndarray, semi: np.ndarray, rot: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalised ellipsoid radius (1 on the surface) at every voxel."""
        c = [float(v) for v in centre]
        s = [float(v) for v in semi]
        dx, dy, dz = self.x - c[0], self.y - c[1], self.z - c[2]
        if rot is None:
            return np.sqrt((dx / s[0]) ** 2 + (dy / s[1]) ** 2 + (dz / s[2]) ** 2)
        r = [[float(v) for v in row] for row in rot]
        total = None
        for a in range(3):
            u = (r[a][0] * dx + r[a][1] * dy + r[a][2] * dz) / s[a]
            total = u * u if total is None else total + u * u
        return np.sqrt(total)


def _soft(thr: float | np.ndarray, f: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume membership of ``f < thr`` with an edge of about ``4 * width``."""
    return expit((thr - f) / width).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    layers: list[tuple[np.ndarray, int]]  # (soft membership, tissue column), composited in order
    tissues: np.ndarray
    parenchyma_soft: np.ndarray
    deep_wm: np.ndarray
    periventricular_wm: np.ndarray
    parenchyma: np.ndarray
    texture: np.ndarray


@dataclass
class _HeadFields:
    """The head's shape and the smooth random fields that every layer is cut from."""

    rho: np.ndarray  # perturbed ellipsoid radius of the head, 1 on the scalp surface
    low: np.ndarray  # coarse field (6 control points per axis)
    mid: np.ndarray  # medium field (10 control points per axis)
    fold: np.ndarray  # fine field whose zero level set places the sulci
    n_fold: int  # control points per axis of ``fold``
    width: float  # partial-volume edge, about one voxel in ellipsoid-radius units


@dataclass
class _Layers:
    """Soft memberships (0-1) of the nested head layers, fissure included."""

    head: np.ndarray  # inside the scalp surface
    skull: np.ndarray  # inside the skull's outer surface
    inner: np.ndarray  # inside the skull's inner surface (CSF and brain)
    brain: np.ndarray
    wm: np.ndarray
    sulcus: np.ndarray  # CSF of the sulci and the interhemispheric fissure
    depth: np.ndarray  # inward distance from the brain surface
    wm_depth: np.ndarray  # depth at which the white matter starts


@dataclass
class _DeepStructures:
    """Deep grey matter and lateral ventricles of both hemispheres."""

    dgm: np.ndarray  # soft membership of the deep grey matter
    vent: np.ndarray  # soft membership of the ventricles
    dgm_radius: np.ndarray  # normalised ellipsoid radius of the nearest deep grey nucleus
    vent_radius: np.ndarray  # perturbed normalised ellipsoid radius of the nearest ventricle


def _head_fields(rng: np.random.Generator, grid: _Grid, size: int) -> _HeadFields:
    """Draw the head ellipsoid and the shared smooth fields."""
    vox = grid.voxel
    jitter = rng.uniform(0.94, 1.04, 3)
    head_semi = np.array([0.74, 0.88, 0.80]) * jitter
    head_centre = np.array([0.0, rng.uniform(-0.03, 0.03), rng.uniform(-0.06, 0.0)])
    low = grid.smooth_field(rng, 6)
    mid = grid.smooth_field(rng, 10)
    n_fold = int(np.clip(size // 3, 8, 32))
    fold = grid.smooth_field(rng, n_fold)
    rho = grid.ellipsoid(head_centre, head_semi) + 0.025 * low
    width = 0.3 * vox * 1.2  # about one voxel of edge in ellipsoid-radius units
    return _HeadFields(rho=rho, low=low, mid=mid, fold=fold, n_fold=n_fold, width=width)


def _layers(rng: np.random.Generator, grid: _Grid, fields: _HeadFields) -> _Layers:
    """Scalp, skull, CSF, folded cortex and white matter, then the interhemispheric fissure."""
    vox, width, rho = grid.voxel, fields.width, fields.rho
    t_scalp = rng.uniform(0.05, 0.07)
    t_skull = rng.uniform(0.05, 0.07)
    t_csf = rng.uniform(0.02, 0.035)
    t_gm = rng.uniform(0.09, 0.12)
    head = _soft(1.0, rho, width)
    skull = _soft(1.0 - t_scalp, rho, width)
    inner = _soft(1.0 - t_scalp - t_skull, rho, width)
    rho_b = rho + 0.015 * fields.mid
    brain_edge = 1.0 - t_scalp - t_skull - t_csf
    brain = _soft(brain_edge, rho_b, width)
    # Sulci are thin CSF sheets on the zero level set of `fold`, reaching into the cortex; the
    # white matter sits deeper next to a sulcus and comes closer to the surface in a gyral crown.
    depth = brain_edge - rho_b  # inward distance from the brain surface
    closeness = np.minimum(np.abs(fields.fold), 1.0)
    wm_depth = t_gm * (1.6 - 1.0 * closeness)
    wm = _soft(0.0, wm_depth - depth, width)
    sheet = 0.5 * vox * 1.2 * fields.n_fold / 2.0  # about 1 voxel thick
    sulcus = _soft(sheet, np.abs(fields.fold), 0.3 * sheet) * _soft(1.3 * t_gm, depth, width)
    fissure, wm_kept = _fissure(rng, grid, fields, t_gm)
    wm = wm * wm_kept
    sulcus = np.maximum(sulcus, fissure) * (1.0 - wm) * brain
    return _Layers(
        head=head,
        skull=skull,
        inner=inner,
        brain=brain,
        wm=wm,
        sulcus=sulcus,
        depth=depth,
        wm_depth=wm_depth,
    )


def _fissure(
    rng: np.random.Generator, grid: _Grid, fields: _HeadFields, t_gm: float
) -> tuple[np.ndarray, np.ndarray]:
    """The interhemispheric fissure's CSF membership and the white-matter fraction it spares.

    Full height at the poles, above the corpus callosum elsewhere; it splits the white matter
    too, lined with cortex (of thickness about ``t_gm``).
    """
    mid_x = np.abs(grid.x - 0.01 * fields.mid)
    z_fissure = rng.uniform(-0.15, 0.0)
    fissure_w = grid.voxel * rng.uniform(0.4, 0.7)
    extent = np.maximum(
        _soft(0.0, z_fissure - grid.z, 0.04), _soft(0.0, 0.5 - np.abs(grid.y), 0.04)
    )
    fissure = _soft(fissure_w, mid_x, 0.5 * fields.width) * extent
    wm_kept = 1.0 - _soft(fissure_w + 0.6 * t_gm, mid_x, fields.width) * extent
    return fissure, wm_kept


def _deep_structures(rng: np.random.Generator, grid: _Grid, fields: _HeadFields) -> _DeepStructures:
    """Deep grey matter (thalamus / basal ganglia) and lateral ventricles, both hemispheres."""
    scale_v = rng.uniform(0.8, 1.4)
    dgm_f = None
    vent_f = None
    for side in (-1.0, 1.0):
        c = np.array([side * rng.uniform(0.15, 0.2), rng.uniform(-0.08, 0.0), -0.02])
        s = np.array([0.09, 0.17, 0.11]) * rng.uniform(0.9, 1.1, 3)
        e = grid.ellipsoid(c, s, rotation_matrix(np.array([0.0, 0.0, side * 0.25])))
        dgm_f = e if dgm_f is None else np.minimum(dgm_f, e)
        c = np.array([side * 0.085 * scale_v, rng.uniform(-0.03, 0.03), 0.12])
        s = np.array([0.06 * scale_v, 0.30, 0.11 * scale_v]) * rng.uniform(0.9, 1.1, 3)
        e = grid.ellipsoid(c, s, rotation_matrix(np.array([0.0, side * 0.15, side * 0.2])))
        vent_f = e if vent_f is None else np.minimum(vent_f, e)
    vent_f = vent_f + 0.12 * fields.mid
    dgm = _soft(1.0, dgm_f + 0.08 * fields.low, 4 * fields.width)
    vent = _soft(1.0, vent_f, 4 * fields.width)
    return _DeepStructures(dgm=dgm, vent=vent, dgm_radius=dgm_f, vent_radius=vent_f)


def _assemble_anatomy(
    grid: _Grid, layers: _Layers, deep: _DeepStructures, texture: np.ndarray
) -> _Anatomy:
    """Compositing order, hard tissue classes and the masks lesions are placed in."""
    ly = layers
    composited = [
        (ly.head, _SCALP),
        (ly.skull, _SKULL),
        (ly.inner, _CSF),
        (ly.brain, _GM),
        (ly.wm, _WM),
        (deep.dgm, _DGM),
        (ly.sulcus, _CSF),
        (deep.vent, _CSF),
    ]
    tissues = np.zeros(grid.shape, dtype=np.uint8)
    memberships = (ly.head, ly.skull, ly.inner, ly.brain, ly.wm, deep.dgm, ly.sulcus, deep.vent)
    for m, cls in zip(memberships, (1, 2, 3, 4, 5, 6, 3, 7), strict=True):
        tissues[m > 0.5] = cls
    parenchyma = (tissues >= TISSUE_CLASSES["gm"]) & (tissues <= TISSUE_CLASSES["deep_gm"])
    is_wm = tissues == TISSUE_CLASSES["wm"]
    margin = 1.5 * grid.voxel * 1.2
    clear_of_deep = (deep.vent_radius > 1.4) & (deep.dgm_radius > 1.3)
    deep_wm = is_wm & (ly.depth - ly.wm_depth > margin) & clear_of_deep
    periventricular_wm = is_wm & (deep.vent_radius < 1.6)
    return _Anatomy(
        layers=composited,
        tissues=tissues,
        parenchyma_soft=ly.brain * (1.0 - deep.vent) * (1.0 - ly.sulcus),
        deep_wm=deep_wm,
        periventricular_wm=periventricular_wm,
        parenchyma=parenchyma,
        texture=texture,
    )


def _anatomy(rng: np.random.Generator, grid: _Grid, size: int) -> _Anatomy:
    """Draw one head's anatomy (the draws happen in this order: fields, layers, deep, texture)."""
    fields = _head_fields(rng, grid, size)
    layers = _layers(rng, grid, fields)
    deep = _deep_structures(rng, grid, fields)
    texture = grid.smooth_field(rng, 16)
    return _assemble_anatomy(grid, layers, deep, texture)


# ----------------------------------------------------------------------------------- lesions


@dataclass
class _Lesions:
    label: np.ndarray  # bool
    membership: np.ndarray  # float32 soft partial-volume membership of the owning lesion
    owner: np.ndarray  # int16, 0 = none, k = lesion k (1-based)
    contrast: np.ndarray  # (n_lesions + 1, len(CONTRASTS)) signed relative contrast
    radii_vox: list[float]


def _lesion_contrast(rng: np.random.Generator) -> np.ndarray:
    """Signed relative contrast of one lesion for every contrast in CONTRASTS."""
    flair = rng.uniform(0.12, 0.25) if rng.random() < 0.25 else rng.uniform(0.3, 0.9)
    t1 = 0.05 + 0.55 * flair * rng.uniform(0.3, 1.0)
    t2 = flair * rng.uniform(1.0, 1.4)
    t1ce = rng.uniform(0.25, 0.6) if rng.random() < 0.25 else -t1
    return np.array([flair, -t1, t2, t1ce, 0.5 * t2, 0.3 * flair * rng.uniform(0.0, 1.0)])


def _lesion_blob(rng: np.random.Generator, step: tuple[float, ...], radius: float) -> np.ndarray:
    """Signed blob field (> 0 inside) on a local box centred on the lesion (odd sizes).

    Works in finest-voxel units; ``step`` is each axis's voxel size in those units.
    """
    half = int(math.ceil(1.7 * radius + 1.5))
    axes = [
        (np.arange(-math.ceil(half / st), math.ceil(half / st) + 1) * st).astype(np.float32)
        for st in step
    ]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    n_sub = 1 if radius < 3.0 else int(rng.integers(1, 4))
    phi = None
    for k in range(n_sub):
        offset = np.zeros(3) if k == 0 else rng.uniform(-0.6, 0.6, 3) * radius
        r = radius if k == 0 else radius * rng.uniform(0.5, 0.85)
        semi = r * rng.uniform(0.7, 1.3, 3)
        rot = rotation_matrix(rng.uniform(-np.pi, np.pi, 3))
        dx, dy, dz = x - offset[0], y - offset[1], z - offset[2]
        d2 = None
        for a in range(3):
            u = (rot[a, 0] * dx + rot[a, 1] * dy + rot[a, 2] * dz) / semi[a]
            d2 = u * u if d2 is None else d2 + u * u
        f = 1.0 - np.sqrt(d2)
        phi = f if phi is None else np.maximum(phi, f)
    sigma = [max(0.7, 0.35 * radius) / st for st in step]
    noise = ndi.gaussian_filter(rng.standard_normal(phi.shape).astype(np.float32), sigma)
    noise /= max(float(noise.std()), 1e-6)
    phi = phi + rng.uniform(0.2, 0.4) * noise
    return phi.astype(np.float32)


@dataclass(frozen=True)
class _LesionBudget:
    """How much lesion a case gets, in voxels, and how large a lesion may be."""

    target: float  # stop placing lesions once this many voxels are lesion
    cap: float  # never exceed this many lesion voxels (keeps the last lesion from overshooting)
    r_max: float  # largest nominal radius, in finest voxels


@dataclass
class _LesionCanvas:
    """The lesion maps of one case, painted one lesion at a time."""

    label: np.ndarray  # bool
    membership: np.ndarray  # float32 soft membership of the owning lesion
    owner: np.ndarray  # int16, 0 = none, k = lesion k (1-based)
    contrasts: list[np.ndarray]  # per lesion, after a zero row for "no lesion"
    radii: list[float]  # nominal radius of each lesion, in finest voxels
    placed: list[tuple[np.ndarray, float]]  # (centre in finest-voxel units, radius) per lesion
    n_voxels: int = 0  # lesion voxels so far

    @classmethod
    def empty(cls, shape: tuple[int, int, int]) -> _LesionCanvas:
        """A canvas with no lesion."""
        return cls(
            label=np.zeros(shape, dtype=bool),
            membership=np.zeros(shape, dtype=np.float32),
            owner=np.zeros(shape, dtype=np.int16),
            contrasts=[np.zeros(len(CONTRASTS))],
            radii=[],
            placed=[],
        )

    def paint(
        self, dst: tuple[slice, ...], phi: np.ndarray, inside: np.ndarray, radius: float
    ) -> None:
        """Add the next lesion's mask ``inside`` and soft membership (from ``phi``) at ``dst``."""
        k = len(self.radii) + 1
        self.label[dst] |= inside
        m = _soft(0.0, -phi, 0.25 / radius)
        upd = m > self.membership[dst]
        self.membership[dst] = np.where(upd, m, self.membership[dst])
        self.owner[dst] = np.where(upd, np.int16(k), self.owner[dst])

    def lesions(self) -> _Lesions:
        """The finished :class:`_Lesions`."""
        contrast = np.stack(self.contrasts)
        return _Lesions(self.label, self.membership, self.owner, contrast, self.radii)


def _lesion_budget(rng: np.random.Generator, spec: PhantomSpec, n_vox: int) -> _LesionBudget:
    """Draw a log-uniform lesion voxel target well inside ``spec.lesion_fraction``."""
    low_frac, high_frac = spec.lesion_fraction
    target = n_vox * math.exp(rng.uniform(math.log(1.6 * low_frac), math.log(0.7 * high_frac)))
    cap = 0.95 * high_frac * n_vox
    r_max = spec.max_lesion_radius or max(3.0, 10.0 * spec.size / 64.0)
    return _LesionBudget(target=target, cap=cap, r_max=r_max)


def _centre_pools(anatomy: _Anatomy) -> list[np.ndarray]:
    """Flat voxel indices where a lesion centre may go: deep WM, periventricular WM, parenchyma.

    An empty WM pool falls back to the parenchyma (the last pool, which may itself be empty).
    """
    pools = [np.flatnonzero(m) for m in (anatomy.deep_wm, anatomy.periventricular_wm)]
    pools.append(np.flatnonzero(anatomy.parenchyma))
    return [p if p.size else pools[-1] for p in pools]


def _pick_centre(
    rng: np.random.Generator,
    pool: np.ndarray,
    grid: _Grid,
    radius: float,
    placed: list[tuple[np.ndarray, float]],
) -> np.ndarray:
    """A voxel from ``pool``, preferably clear of the lesions placed so far (8 tries)."""
    step = np.asarray(grid.step)
    for _try in range(8):  # prefer separate lesions; confluent ones happen when crowded
        centre = np.array(np.unravel_index(pool[rng.integers(pool.size)], grid.shape))
        pos = centre * step
        if all(np.linalg.norm(pos - p) >= 0.9 * (radius + r) + 1.0 for p, r in placed):
            break
    return centre


def _box_slices(
    centre: np.ndarray, box: tuple[int, ...], shape: tuple[int, int, int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """``(src, dst)``: the part of a local box centred on ``centre`` that lies in the volume."""
    first = [int(c) - (n - 1) // 2 for c, n in zip(centre, box, strict=True)]
    src = tuple(
        slice(max(0, -f), n - max(0, f + n - s)) for f, n, s in zip(first, box, shape, strict=True)
    )
    dst = tuple(slice(max(0, f), min(s, f + n)) for f, n, s in zip(first, box, shape, strict=True))
    return src, dst


def _main_blob(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(phi, inside)`` keeping only the largest component of ``phi > 0``; None if empty.

    Satellite specks and their halo are pushed outside (``phi = -1``).
    """
    inside = phi > 0
    comps, n_comp = ndi.label(inside)
    if n_comp == 0:
        return None
    if n_comp > 1:
        sizes = np.bincount(comps.ravel())[1:]
        keep = comps == (int(np.argmax(sizes)) + 1)
        drop = ndi.binary_dilation(inside & ~keep)
        phi = np.where(drop & ~keep, np.float32(-1.0), phi)
        inside = keep
    return phi, inside


def _try_lesion(
    rng: np.random.Generator,
    grid: _Grid,
    anatomy: _Anatomy,
    pools: list[np.ndarray],
    budget: _LesionBudget,
    canvas: _LesionCanvas,
) -> None:
    """Draw one lesion and paint it on ``canvas`` unless it adds nothing or overshoots the cap."""
    radius = float(np.clip(rng.lognormal(math.log(1.5), 0.6), 1.0, budget.r_max))
    pool = pools[int(rng.choice(3, p=[0.55, 0.35, 0.10]))]
    centre = _pick_centre(rng, pool, grid, radius, canvas.placed)
    phi = _lesion_blob(rng, grid.step, radius)
    lesion_contrast = _lesion_contrast(rng)
    src, dst = _box_slices(centre, phi.shape, grid.shape)
    blob = _main_blob(phi[src])
    if blob is None:
        return
    phi, inside = blob
    in_parenchyma = inside & anatomy.parenchyma[dst]
    n_new = int(np.count_nonzero(in_parenchyma & ~canvas.label[dst]))
    if n_new == 0 or canvas.n_voxels + n_new > budget.cap:
        return
    canvas.n_voxels += n_new
    canvas.paint(dst, phi, in_parenchyma, radius)
    canvas.contrasts.append(lesion_contrast)
    canvas.radii.append(radius)
    canvas.placed.append((centre * np.asarray(grid.step), radius))


def _lesions(
    rng: np.random.Generator,
    grid: _Grid,
    anatomy: _Anatomy,
    spec: PhantomSpec,
    lesion_free: bool,
) -> _Lesions:
    """Place lesions in the parenchyma until the drawn voxel budget is met (300 tries, 120 max)."""
    canvas = _LesionCanvas.empty(grid.shape)
    if lesion_free:
        return canvas.lesions()
    budget = _lesion_budget(rng, spec, canvas.label.size)
    pools = _centre_pools(anatomy)
    if pools[-1].size == 0:
        return canvas.lesions()
    for _attempt in range(300):
        if canvas.n_voxels >= budget.target or len(canvas.radii) >= 120:
            break
        _try_lesion(rng, grid, anatomy, pools, budget, canvas)
    canvas.membership *= anatomy.parenchyma_soft
    return canvas.lesions()


# ----------------------------------------------------------------------------------- imaging


def _bias_field(rng: np.random.Generator, grid: _Grid, strength: float) -> np.ndarray:
    """exp of a random quadratic polynomial in the coordinates (std of the log ~ strength)."""
    x, y, z = grid.x, grid.y, grid.z
    terms = (x, y, z, x * x - 0.33, y * y - 0.33, z * z - 0.33, x * y, y * z, x * z)
    coef = rng.normal(0.0, strength, len(terms)) * np.array([1, 1, 1, 1.5, 1.5, 1.5, 2, 2, 2])
    log_field = np.zeros(grid.shape, dtype=np.float32)
    for c, t in zip(coef, terms, strict=True):
        log_field += np.float32(c) * t
    return np.exp(log_field)


def _image(
    rng: np.random.Generator,
    channel: int,
    grid: _Grid,
    anatomy: _Anatomy,
    lesions: _Lesions,
    spec: PhantomSpec,
) -> np.ndarray:
    levels = _TISSUE_INTENSITY[channel] * rng.uniform(0.95, 1.05, _TISSUE_INTENSITY.shape[1])
    levels = levels.astype(np.float32)
    img = np.zeros(grid.shape, dtype=np.float32)
    for m, cls in anatomy.layers:
        img += m * (levels[cls] - img)
    lesion_gain = lesions.contrast[:, channel].astype(np.float32)[lesions.owner]
    img *= 1.0 + lesions.membership * lesion_gain
    img *= 1.0 + np.float32(rng.uniform(0.015, 0.04)) * anatomy.texture
    img *= _bias_field(rng, grid, spec.bias)
    sigma = np.float32(rng.uniform(*spec.noise) * levels[_WM])
    real = img + sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    img = np.sqrt(real * real + imag * imag)  # Rician magnitude
    img *= np.float32(10.0 ** rng.uniform(2.3, 3.2))  # arbitrary scanner scale
    return img


def _affine(rng: np.random.Generator, spec: PhantomSpec) -> np.ndarray:
    linear = np.diag(spec.spacing)
    if spec.oblique:
        angles = np.radians(rng.uniform(5.0, 20.0, 3) * rng.choice([-1.0, 1.0], 3))
        linear = rotation_matrix(angles) @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    centre = (np.asarray(spec.shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = -linear @ centre + rng.uniform(-5.0, 5.0, 3)
    return affine


def make_phantom(
    seed: int | np.random.SeedSequence | np.random.Generator,
    spec: PhantomSpec | None = None,
    *,
    lesion_free: bool | None = None,
) -> Phantom:
    """Generate one synthetic case.

    Args:
        seed: non-negative integer, SeedSequence or Generator. A Generator is only used to
            spawn child streams (which advances its spawn counter, so a second call differs).
        spec: what to generate; default ``PhantomSpec()`` (64^3, FLAIR + T1, 1 mm).
        lesion_free: force a lesion-free (True) or lesion (False) case; None draws it with
            probability ``spec.lesion_free_fraction``. The anatomy does not depend on it.

    Returns:
        The :class:`Phantom`.
    """
    spec = PhantomSpec() if spec is None else spec
    geometry_rng, anatomy_rng, lesion_rng, imaging_rng = _children(seed, 4)
    draw = lesion_rng.random()  # drawn even when forced, so the lesions do not depend on it
    if lesion_free is None:
        lesion_free = bool(draw < spec.lesion_free_fraction)
    grid = _Grid(spec)
    anatomy = _anatomy(anatomy_rng, grid, spec.size)
    lesions = _lesions(lesion_rng, grid, anatomy, spec, lesion_free)
    channel_rngs = imaging_rng.spawn(spec.channels)
    images = tuple(
        _image(channel_rngs[c], c, grid, anatomy, lesions, spec) for c in range(spec.channels)
    )
    finest = min(spec.spacing)
    return Phantom(
        images=images,
        label=lesions.label.astype(np.uint8),
        tissues=anatomy.tissues,
        affine=_affine(geometry_rng, spec),
        spacing=spec.spacing,
        channel_names=spec.channel_names,
        lesion_radii=tuple(float(r * finest) for r in lesions.radii_vox),
    )


def make_case(
    seed: int, index: int, spec: PhantomSpec | None = None, *, test: bool = False
) -> Phantom:
    """Case ``index`` of the dataset that :func:`write_dataset` writes with ``seed``.

    Args:
        seed: dataset seed, a non-negative integer.
        index: case index within its split.
        spec: what to generate (default ``PhantomSpec()``).
        test: the test split instead of the training split.
    """
    spec = PhantomSpec() if spec is None else spec
    return make_phantom(
        case_seed(seed, index, test=test),
        spec,
        lesion_free=case_is_lesion_free(seed, index, spec.lesion_free_fraction, test=test),
    )


# ----------------------------------------------------------------------------------- dataset


def case_id(index: int, *, test: bool = False, width: int = 3) -> str:
    """Case identifier: ``phantom_007`` (training) or ``phantom_test_007`` (test)."""
    return f"phantom_{'test_' if test else ''}{index:0{width}d}"


def _check_dataset_args(n_cases: int, n_test: int, seed: int, name: str) -> None:
    """Raise ValueError for a bad case count, seed or dataset name."""
    for arg, value, least in (("n_cases", n_cases, 1), ("n_test", n_test, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise ValueError(f"{arg} must be an integer >= {least}, got {value!r}")
    if not _DATASET_NAME.match(name):
        raise ValueError(f"name must look like 'Dataset123_Name', got {name!r}")


def _prepare_dataset_folder(root: Path, *, with_test: bool, overwrite: bool) -> None:
    """Create the split folders; with ``overwrite``, first delete an existing dataset's files.

    Raises:
        InputError: ``root`` is not a directory, or is not empty and ``overwrite`` is False.
    """
    if root.exists():
        if not root.is_dir():
            raise InputError(f"{root}: exists and is not a directory")
        if any(root.iterdir()):
            if not overwrite:
                raise InputError(
                    f"{root}: dataset folder already exists and is not empty "
                    "(use --overwrite to replace it)"
                )
            stale = root / "dataset.json"
            stale.unlink(missing_ok=True)
            for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
                if (root / sub).is_dir():
                    for f in (root / sub).glob("*.nii.gz"):
                        f.unlink()
    subdirs = ["imagesTr", "labelsTr"] + (["imagesTs", "labelsTs"] if with_test else [])
    for sub in subdirs:
        (root / sub).mkdir(parents=True, exist_ok=True)


def _write_cases(
    root: Path, n_cases: int, n_test: int, seed: int, spec: PhantomSpec, *, progress: bool
) -> None:
    """Generate and write every training case, then every test case (images and label)."""
    jobs = [(i, False) for i in range(n_cases)] + [(i, True) for i in range(n_test)]
    width = max(3, len(str(max(n_cases, n_test) - 1)))
    bar = tqdm(total=len(jobs), desc="synth", unit="case", disable=not progress)
    try:
        for index, test in jobs:
            phantom = make_case(seed, index, spec, test=test)
            cid = case_id(index, test=test, width=width)
            images_dir, labels_dir = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
            for c, img in enumerate(phantom.images):
                write_image(root / images_dir / f"{cid}_{c:04d}.nii.gz", img, phantom.affine)
            write_image(root / labels_dir / f"{cid}.nii.gz", phantom.label, phantom.affine)
            bar.update(1)
    finally:
        bar.close()


def _dataset_json(name: str, spec: PhantomSpec, seed: int, n_cases: int, n_test: int) -> dict:
    """The ``dataset.json`` contents, with the generator parameters under ``synthetic``."""
    synthetic = asdict(spec)
    synthetic["seed"] = int(seed)
    synthetic["shape"] = list(spec.shape)
    return {
        "name": name,
        "description": "Synthetic MRI-like head phantoms with lesions (segmenter synth)",
        "channel_names": {str(c): n for c, n in enumerate(spec.channel_names)},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": int(n_cases),
        "numTest": int(n_test),
        "file_ending": ".nii.gz",
        "synthetic": synthetic,
    }


def write_dataset(
    out: str | Path,
    n_cases: int,
    seed: int,
    spec: PhantomSpec | None = None,
    *,
    name: str = "Dataset900_Phantom",
    n_test: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic dataset in the nnU-Net v2 raw layout.

    Writes ``out/<name>/imagesTr/{case}_{XXXX}.nii.gz``, ``labelsTr/{case}.nii.gz``, for
    ``n_test > 0`` also ``imagesTs/`` and ``labelsTs/`` (so predictions can be scored), and
    ``dataset.json`` last (channel_names, labels, numTraining, file_ending, plus numTest and the
    generator parameters under ``synthetic``). Every file is written atomically; the same
    arguments give byte-identical files.

    Args:
        out: parent directory.
        n_cases: number of training cases, >= 1.
        seed: dataset seed, a non-negative integer.
        spec: what to generate (default ``PhantomSpec()``).
        name: dataset folder name, ``DatasetXXX_Name``.
        n_test: number of test cases, >= 0.
        overwrite: replace an existing non-empty dataset folder's case files; otherwise an
            existing non-empty folder is an error.
        progress: show a tqdm progress bar.

    Returns:
        The dataset folder ``out/<name>``.

    Raises:
        ValueError: bad argument.
        InputError: the dataset folder exists, is not empty and ``overwrite`` is False.
    """
    spec = PhantomSpec() if spec is None else spec
    _check_dataset_args(n_cases, n_test, seed, name)
    root = Path(out) / name
    _prepare_dataset_folder(root, with_test=bool(n_test), overwrite=overwrite)
    _write_cases(root, n_cases, n_test, seed, spec, progress=progress)
    meta = _dataset_json(name, spec, seed, n_cases, n_test)
    write_text(root / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return root


__all__ = [
    "CONTRASTS",
    "TISSUE_CLASSES",
    "Phantom",
    "PhantomSpec",
    "case_id",
    "case_is_lesion_free",
    "case_seed",
    "make_case",
    "make_phantom",
    "write_dataset",
]


PERTURBATIONS = ("erode", "dilate", "shift", "drop", "noise")


def perturb_mask(mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A plausible imperfect 'prediction' made from a binary mask, for metric tests and benchmarks.

    Args:
        mask: ``(X, Y, Z)`` bool reference mask.
        kind: ``erode`` / ``dilate`` (one voxel), ``shift`` (one voxel along each axis),
            ``drop`` (about 30 % of the 26-connected lesions removed) or ``noise`` (boundary
            noise that splits lesions and adds small false positives).
        rng: random generator (``drop`` and ``noise``).

    Returns:
        ``(X, Y, Z)`` bool mask.
    """
    from scipy import ndimage

    ref = np.asarray(mask, dtype=bool)
    if kind == "erode":
        return ndimage.binary_erosion(ref)
    if kind == "dilate":
        return ndimage.binary_dilation(ref)
    if kind == "shift":
        return np.roll(ref, (1, -1, 1), axis=(0, 1, 2))
    if kind == "drop":
        lab, n = ndimage.label(ref, np.ones((3, 3, 3)))
        keep = rng.random(n + 1) > 0.3
        keep[0] = False
        return keep[lab]
    if kind == "noise":
        flip = rng.random(ref.shape)
        return (ref & (flip > 0.25)) | (ndimage.binary_dilation(ref) & (flip < 0.2))
    raise ValueError(f"unknown perturbation {kind!r}; valid: {', '.join(PERTURBATIONS)}")
