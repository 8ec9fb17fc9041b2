"""The dataset plan (``segmenter plan``): what nnU-Net's planner decides from a fingerprint.

Not a run's plan (:mod:`segmenter.planning.run_plan`, what ``predict`` repeats): the dataset plan
suggests config values (``train --plan`` takes them over) and is written to
``plans/NAME/plan.json``.

From the fingerprint (:mod:`segmenter.planning.fingerprint`) and the config's ``plan`` section:

- **target spacing**: :func:`segmenter.preprocessing.resampling.target_spacing` (median; the 10th
  percentile along a coarse axis of anisotropic data), then coarsened where the lesions are
  large (:func:`spacing_for_lesions`, ``plan.max_spacing_mm``): the fine axes go to the
  coarsest spacing at which the small lesions (the ``plan.lesion_percentile`` of the
  fingerprint's lesion volumes, those the evaluation preset counts) still span
  ``plan.lesion_voxels`` voxels across, but no coarser than lets one patch of the budget hold
  the median (cropped) scan: nnU-Net's low-resolution idea (a patch that sees the whole
  brain), bounded by what the lesions allow. Whole tumours (tens of ml) go to 2 mm, MS lesions
  of a few mm3 stay at 1 mm (``configs/experiments/brats_width_spacing``);
- **median resampled shape**: the median over cases of each case's nonzero-cropped shape at
  the target spacing;
- **patch size**: starts from that median shape and, while it holds more voxels than the budget
  (``plan.cpu_patch_voxels`` or ``plan.gpu_patch_voxels``), shrinks the axis with the largest
  physical extent by 10 %; then each axis is rounded to the nearest multiple of the network's
  divisor (at least one divisor; the longest axis loses one divisor while that went over the
  budget), so no padding is needed in training;
- **depth**: one level more than the number of times the longest patch axis can be halved and
  keep 4 voxels (nnU-Net's smallest feature map), at most ``plan.max_depth``; per-axis strides
  and kernels then follow :func:`segmenter.nn.network.plan_topology` (short and coarse axes pool
  less);
- **batch size**: ``plan.batch_size``;
- **width** (only with ``plan.minutes``, the training budget): ``segmenter plan`` times a
  training step of each width of ``plan.widths`` on this machine
  (:mod:`segmenter.training.speed`) and :func:`choose_width` keeps the widest that trains
  ``plan.min_steps`` steps in the budget; the plan records the timings and why;
- **normalisation** per channel from ``dataset.json``'s channel names: ``CT`` channels are
  clipped to the fingerprint's 0.5 and 99.5 percentiles (medians over cases, inside the
  nonzero mask) and z-scored with the fingerprint's median mean and standard deviation;
  every other channel (MRI) is z-scored per case inside its nonzero mask.

``plan.json`` holds the result; ``fingerprint.json`` beside it the data it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.config import Config, ModelConfig, PlanConfig
from segmenter.errors import InputError
from segmenter.evaluation.lesions import PRESETS
from segmenter.planning.topology import MIN_FEATURE_MAP_SIZE, plan_topology
from segmenter.preprocessing.resampling import is_anisotropic, new_shape, target_spacing

#: Channel names (case-insensitive) normalised as CT.
CT_NAMES = ("ct",)
#: Factor by which the largest axis shrinks per step while the patch is over budget.
SHRINK = 0.9
#: The lesion rule coarsens an axis only to more than this many times its spacing.
COARSEN_MARGIN = 1.1


def normalisation(channel_names: Sequence[str], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-channel normalisation scheme (module docstring) from the fingerprint summary."""
    schemes = []
    for name, stats in zip(channel_names, summary["channels"], strict=True):
        if str(name).strip().lower() in CT_NAMES:
            pct = stats["median_percentiles"]
            schemes.append({
                "channel": str(name), "scheme": "ct_clip_zscore",
                "clip": [pct["0.5"], pct["99.5"]],
                "mean": stats["median_mean"], "std": stats["median_std"],
            })  # fmt: skip
        else:
            schemes.append({"channel": str(name), "scheme": "zscore_nonzero"})
    return schemes


def _depth(patch: Sequence[float], max_depth: int) -> int:
    pools = math.floor(math.log2(max(max(patch), 1.0) / MIN_FEATURE_MAP_SIZE))
    return int(min(max(pools + 1, 2), max_depth))


def patch_and_depth(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    max_voxels: int,
    max_depth: int,
    model: ModelConfig | None = None,
) -> tuple[tuple[int, int, int], int]:
    """Patch size (voxels) and depth for a median shape at ``spacing`` (module docstring)."""
    patch = [max(float(n), 8.0) for n in median_shape]
    while math.prod(patch) > max_voxels:
        extents = [p * s for p, s in zip(patch, spacing, strict=True)]
        axis = int(np.argmax(extents))
        patch[axis] = max(8.0, patch[axis] * SHRINK)
        if all(p <= 8.0 for p in patch):
            break
    depth = _depth(patch, max_depth)
    cfg = dataclasses.replace(model or ModelConfig(), depth=depth)
    rounded = [int(round(p)) for p in patch]
    divisor = plan_topology(cfg, spacing=spacing, patch_size=rounded).divisor
    final = [max(d, int(round(p / d)) * d) for p, d in zip(patch, divisor, strict=True)]
    while math.prod(final) > max_voxels:  # rounding up went over: one divisor off the longest
        extents = [
            f * s if f > d else -1.0 for f, s, d in zip(final, spacing, divisor, strict=True)
        ]
        axis = int(np.argmax(extents))
        if extents[axis] < 0:
            break
        final[axis] -= divisor[axis]
    return (final[0], final[1], final[2]), depth


def _small_lesion_extent(volume_mm3: float, thick_mm: float | None) -> float:
    """The in-plane diameter (mm) of a lesion of ``volume_mm3``: a sphere's on isotropic
    data; with slices ``thick_mm`` thick, a lesion thinner than a slice spreads in-plane over
    that one slice (a disc one slice high)."""
    sphere = (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)
    if thick_mm is None or sphere >= thick_mm:
        return sphere
    return math.sqrt(4.0 * volume_mm3 / (math.pi * thick_mm))


def spacing_for_lesions(
    native: Sequence[float],
    median_shape: Sequence[float],
    lesion_volumes_mm3: Sequence[float],
    patch_voxels: int,
    plan: PlanConfig,
) -> tuple[tuple[float, float, float], dict[str, Any]]:
    """The target spacing coarsened for large lesions, and why (module docstring).

    Args:
        native: the spacing :func:`target_spacing` chose (mm).
        median_shape: the median cropped shape at ``native`` (voxels).
        lesion_volumes_mm3: every training lesion the evaluation counts (mm3).
        patch_voxels: the patch budget.
        plan: the ``plan`` section (``max_spacing_mm``, ``lesion_voxels``, ``lesion_percentile``).

    Returns:
        The spacing and a record of the choice for ``plan.json`` (``why``: one sentence).
    """
    spacing = tuple(float(v) for v in native)
    fine = [a for a in range(3) if not (is_anisotropic(spacing) and spacing[a] == max(spacing))]
    thick = max(spacing) if len(fine) < 3 else None
    record: dict[str, Any] = {"native": list(spacing), "max_spacing_mm": plan.max_spacing_mm}
    ceiling = plan.max_spacing_mm
    if ceiling is None or not lesion_volumes_mm3 or ceiling <= max(spacing[a] for a in fine):
        why = (
            "plan.max_spacing_mm is null" if ceiling is None
            else "no lesions to size it by" if not lesion_volumes_mm3
            else "already that coarse"
        )  # fmt: skip
        return _triple(spacing), record | {"chosen": list(spacing), "why": f"kept: {why}"}
    small = float(np.percentile(lesion_volumes_mm3, plan.lesion_percentile))
    extent = _small_lesion_extent(small, thick)
    by_lesions = extent / plan.lesion_voxels
    # one patch holds the median scan: the fine axes' physical area/volume over the voxels left
    fixed = math.prod(median_shape[a] for a in range(3) if a not in fine)
    extent_mm = math.prod(median_shape[a] * spacing[a] for a in fine)
    by_coverage = (extent_mm / max(patch_voxels / fixed, 1.0)) ** (1.0 / len(fine))
    target = min(by_lesions, by_coverage, ceiling)
    record |= {
        "small_lesion_mm3": small, "lesion_percentile": plan.lesion_percentile,
        "small_lesion_extent_mm": extent, "lesion_limit_mm": by_lesions,
        "coverage_limit_mm": by_coverage,
    }  # fmt: skip
    coarser = [a for a in fine if target > COARSEN_MARGIN * spacing[a]]
    if not coarser:
        reason = (
            f"kept: the small lesions ({small:.3g} mm3, {extent:.2g} mm across) need it"
            if by_lesions <= by_coverage
            else "kept: one patch already holds the median scan"
        )
        return _triple(spacing), record | {"chosen": list(spacing), "why": reason}
    out = list(spacing)
    for a in coarser:
        out[a] = target
    if target == ceiling:
        bound = f"plan.max_spacing_mm {ceiling:g}"
    elif target == by_lesions:
        bound = (
            f"the small lesions ({small:.3g} mm3, {extent:.2g} mm across) keep "
            f"{plan.lesion_voxels:g} voxels across"
        )
    else:
        bound = "one patch then holds the median scan"
    why = f"coarsened to {target:.3g} mm: {bound}"
    return _triple(out), record | {"chosen": out, "why": why}


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


def make_dataset_plan(fingerprint: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """``plan.json`` content for a fingerprint under the config's ``plan`` section.

    Args:
        fingerprint: :func:`segmenter.planning.fingerprint.dataset_fingerprint` output.
        cfg: experiment config (``plan`` budget, ``model`` for the topology rule).

    Returns:
        The plan (plain JSON types).

    Raises:
        ValueError: a fingerprint without cases.
    """
    cases = fingerprint["cases"]
    if not cases:
        raise ValueError("the fingerprint holds no cases")
    spacings = [c["spacing"] for c in cases]
    cropped = [c.get("cropped_shape", c["shape"]) for c in cases]
    p = cfg.plan
    budget = p.cpu_patch_voxels if p.budget == "cpu" else p.gpu_patch_voxels
    native = target_spacing(spacings, cropped)
    counted = PRESETS[cfg.evaluation.preset].min_ref_mm3
    volumes = [v for c in cases for v in c.get("lesion_volumes_mm3", []) if v > counted]
    target, spacing_choice = spacing_for_lesions(
        native, _median_shape(cropped, spacings, native), volumes, budget, p
    )
    spacing_choice["lesions_counted_above_mm3"] = counted
    median = _median_shape(cropped, spacings, target)
    patch, depth = patch_and_depth(median, target, budget, p.max_depth, cfg.model)
    topo = plan_topology(
        dataclasses.replace(cfg.model, depth=depth), spacing=target, patch_size=patch
    )
    return {
        "dataset": fingerprint["dataset"],
        "channel_names": list(fingerprint["channel_names"]),
        "file_ending": fingerprint["file_ending"],
        "n_cases": len(cases),
        "budget": p.budget,
        "budget_patch_voxels": budget,
        "target_spacing": list(target),
        "spacing_choice": spacing_choice,
        "anisotropic": is_anisotropic(target),
        "median_resampled_shape": median,
        "patch_size": list(patch),
        "depth": depth,
        "batch_size": p.batch_size,
        "strides": [list(s) for s in topo.strides],
        "kernels": [list(k) for k in topo.kernels],
        "normalization": normalisation(fingerprint["channel_names"], fingerprint["summary"]),
    }


def _median_shape(
    shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]], target: Sequence[float]
) -> list[float]:
    resampled = [new_shape(shape, sp, target) for shape, sp in zip(shapes, spacings, strict=True)]
    return [float(v) for v in np.median(np.array(resampled, dtype=float), axis=0)]


def steps_in_budget(seconds_per_step: float, minutes: float, overhead: float) -> int:
    """Training steps a budget of ``minutes`` allows at ``seconds_per_step`` (``overhead`` of
    the budget goes to start-up, data and validation)."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be > 0, got {seconds_per_step}")
    return int(minutes * 60.0 * (1.0 - overhead) / seconds_per_step)


def choose_width(timings: Sequence[tuple[int, float]], cfg: PlanConfig) -> dict[str, Any]:
    """The widest measured network that trains ``plan.min_steps`` steps in ``plan.minutes``.

    Args:
        timings: ``(base_filters, seconds per step)`` measured on this machine, any order.
        cfg: the ``plan`` section (``minutes`` set).

    Returns:
        ``base_filters`` (the narrowest measured width when none reaches ``min_steps``: the
        budget is then too short for any of them, and the fastest trains the most), ``why``
        (one sentence) and ``candidates`` (width, seconds per step, steps in the budget).

    Raises:
        ValueError: no timings, or ``plan.minutes`` is not set.
    """
    if not timings:
        raise ValueError("choose_width needs at least one timing")
    if cfg.minutes is None:
        raise ValueError("choose_width needs plan.minutes")
    rows = [
        {"base_filters": int(w), "seconds_per_step": float(sec),
         "steps_in_budget": steps_in_budget(sec, cfg.minutes, cfg.overhead)}
        for w, sec in sorted(timings)
    ]  # fmt: skip
    enough = [r for r in rows if r["steps_in_budget"] >= cfg.min_steps]
    if enough:
        chosen = enough[-1]
        why = (
            f"the widest network that trains at least {cfg.min_steps} steps in {cfg.minutes:g} "
            f"min here ({chosen['steps_in_budget']} steps at {chosen['seconds_per_step']:.2f} s)"
        )
    else:
        chosen = rows[0]
        why = (
            f"no width trains {cfg.min_steps} steps in {cfg.minutes:g} min here; the narrowest "
            f"trains the most ({chosen['steps_in_budget']} steps)"
        )
    return {"base_filters": chosen["base_filters"], "why": why, "candidates": rows}


#: The plan's entries a config takes over, and the config key each sets.
DATASET_PLAN_KEYS = {
    "patch_size": "data.patch_size",
    "batch_size": "data.batch_size",
    "depth": "model.depth",
    "target_spacing": "data.target_spacing",
    "normalization": "data.normalization",
}


def read_dataset_plan(path: str | Path) -> dict[str, Any]:
    """A ``plan.json`` written by ``segmenter plan``.

    Raises:
        InputError: missing or unreadable file, or a file without the plan's keys.
    """
    p = Path(path)
    try:
        plan = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: plan not found (write one with segmenter plan DATASET)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: unreadable plan ({exc})") from None
    missing = [k for k in DATASET_PLAN_KEYS if not isinstance(plan, dict) or k not in plan]
    if missing:
        raise InputError(f"{p}: not a plan.json (no {missing[0]!r})")
    return plan


#: Entries a plan holds only when it was made for a budget (``plan.minutes``).
OPTIONAL_PLAN_KEYS = {"base_filters": "model.base_filters", "max_filters": "model.max_filters"}


def dataset_plan_values(plan: dict[str, Any]) -> dict[str, Any]:
    """Config values (dotted keys) that make an experiment follow ``plan``."""
    values = {key: plan[name] for name, key in DATASET_PLAN_KEYS.items()}
    values.update({key: plan[name] for name, key in OPTIONAL_PLAN_KEYS.items() if name in plan})
    return values
