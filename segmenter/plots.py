"""Comparison plots (matplotlib, Agg backend; PNG files, or figures for notebooks).

Every function takes plain data (rows, dicts, arrays) and returns a matplotlib ``Figure``; pass
``path`` to also write a PNG atomically. No file reading here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.atomic import atomic_path


def _pyplot() -> Any:
    """``matplotlib.pyplot``; the Agg backend unless pyplot was set up before (notebooks)."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path | None, **savefig: Any) -> Any:
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", **({"dpi": 90, "bbox_inches": "tight"} | savefig))
    return fig


def close(fig: Any) -> None:
    """Release a figure once it is written (pyplot keeps every open figure alive)."""
    _pyplot().close(fig)


def recall_by_size(
    bins_by_variant: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path | None = None
) -> Any:
    """Grouped bars: pooled lesion recall per lesion-size bin (mm3), one colour per variant.

    Args:
        bins_by_variant: ``{variant: {bin label: {"n", "detected", "recall"}}}`` (the pooled
            ``recall_by_size`` of each variant's summary).
        path: optional PNG to write.
    """
    plt = _pyplot()
    variants = list(bins_by_variant)
    bins = list(next(iter(bins_by_variant.values()), {}))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bins) * max(1, len(variants)) / 2), 4))
    width = 0.8 / max(len(variants), 1)
    for i, name in enumerate(variants):
        values = [bins_by_variant[name].get(b, {}).get("recall") for b in bins]
        heights = [0.0 if v is None or math.isnan(v) else v for v in values]
        ax.bar(np.arange(len(bins)) + i * width, heights, width, label=name)
    counts = [next(iter(bins_by_variant.values()))[b].get("n", 0) for b in bins]
    ax.set_xticks(np.arange(len(bins)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{b}\n(n={int(n)})" for b, n in zip(bins, counts, strict=True)])
    ax.set_xlabel("reference lesion volume (mm3)")
    ax.set_ylabel("lesion recall")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def metric_spread(
    rows: Sequence[Mapping[str, Any]],
    metrics_to_plot: Sequence[str] = ("dice", "lesion_f1"),
    path: str | Path | None = None,
) -> Any:
    """Per-variant mean (bar) and per-case values (dots) of each metric from comparison rows."""
    plt = _pyplot()
    variants = list(dict.fromkeys(str(r["variant"]) for r in rows))
    fig, axes = plt.subplots(1, len(metrics_to_plot), figsize=(5 * len(metrics_to_plot), 4))
    axes = np.atleast_1d(axes)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, metrics_to_plot, strict=True):
        for i, name in enumerate(variants):
            vals = [_num(r.get(metric)) for r in rows if r["variant"] == name]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                ax.bar(i, float(np.mean(vals)), 0.6, alpha=0.35)
                ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, s=12, color="k")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    return _save(fig, path)


def froc(
    curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path | None = None
) -> Any:
    """False-positive lesions per case (x) against lesion recall (y) over thresholds.

    Args:
        curves: ``{variant: [{"threshold", "fp_per_case", "recall"}, ...]}``.
        path: optional PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, points in curves.items():
        pts = sorted((p["fp_per_case"], p["recall"]) for p in points)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=name)
    ax.set_xlabel("false-positive lesions per case")
    ax.set_ylabel("lesion recall")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    key: str = "val_lesion_f1",
    path: str | Path | None = None,
) -> Any:
    """Training loss and one validation metric per epoch, one line per variant."""
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in histories.items():
        epochs = [_num(r.get("epoch")) for r in rows]
        ax_loss.plot(epochs, [_num(r.get("train_loss")) for r in rows], label=name)
        pts = _validation_points(rows, key)
        if pts:
            ax_val.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel(key)
    ax_val.set_ylim(0, 1.05)
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _validation_points(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(epoch, value) of the rows whose ``key`` holds a number (validated epochs)."""
    pts = [(_num(r.get("epoch")), _num(r.get(key))) for r in rows]
    return [p for p in pts if not math.isnan(p[1])]


#: The validation columns a run's own curves show, and their legend labels.
RUN_CURVES = (("val_dice", "Dice"), ("val_lesion_recall", "lesion recall"),
              ("val_lesion_f1", "lesion F1"))  # fmt: skip


def run_curves(history: Sequence[Mapping[str, Any]], path: str | Path | None = None) -> Any:
    """One run's training loss (log scale) and validation metrics per epoch
    (``training_curves.png`` in a run folder; rows as in ``metrics.csv``)."""
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([_num(h.get("epoch")) for h in history],
                 [_num(h.get("train_loss")) for h in history], label="train loss")  # fmt: skip
    ax_loss.set_xlabel("epoch")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    for key, label in RUN_CURVES:
        pts = _validation_points(history, key)
        if pts:
            ax_val.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylim(0, 1)
    if ax_val.lines:
        ax_val.legend()
    fig.tight_layout()
    _save(fig, path, dpi=80, bbox_inches=None)
    plt.close(fig)
    return fig


def slice_overlay(
    scan: np.ndarray,
    reference: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    title: str = "",
    path: str | Path | None = None,
) -> Any:
    """One slice of a scan with the reference and each variant's prediction outlined.

    Args:
        scan: ``(X, Y)`` intensities of the slice.
        reference: ``(X, Y)`` binary reference mask.
        predictions: ``{variant: (X, Y) binary mask}``.
        title: figure title (e.g. the case id and slice index).
        path: optional PNG to write.
    """
    plt = _pyplot()
    n = 1 + len(predictions)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3))
    axes = np.atleast_1d(axes)
    lo, hi = np.percentile(scan, (1, 99)) if scan.size else (0.0, 1.0)
    panels = [("reference", reference), *predictions.items()]
    for ax, (name, mask) in zip(axes, panels, strict=True):
        ax.imshow(scan.T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if reference.any():
            ax.contour(reference.T, levels=[0.5], colors="lime", linewidths=0.8)
        if name != "reference" and mask.any():
            ax.contour(mask.T, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(f"{title} (green: reference, red: prediction)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def lesion_sizes(
    volumes_mm3: Sequence[float],
    size_bins_mm3: Sequence[float] = (),
    title: str = "",
    path: str | Path | None = None,
) -> Any:
    """Histogram of lesion volumes on a log axis, with the evaluation's size bins marked.

    Args:
        volumes_mm3: one volume per lesion (mm3).
        size_bins_mm3: bin edges to draw as vertical lines (finite, positive ones only).
        title: figure title.
        path: optional PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    vols = np.asarray([v for v in volumes_mm3 if v > 0], dtype=float)
    if vols.size:
        lo, hi = np.log10(vols.min()), np.log10(vols.max())
        edges = np.logspace(lo - 0.05, hi + 0.05, max(8, min(40, int(4 * (hi - lo)) + 8)))
        ax.hist(vols, bins=edges, color="steelblue")
    ax.set_xscale("log")
    for edge in size_bins_mm3:
        if 0 < edge < math.inf:
            ax.axvline(edge, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("lesion volume (mm3, log scale)")
    ax.set_ylabel("lesions")
    ax.set_title(title or f"{vols.size} lesions", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
