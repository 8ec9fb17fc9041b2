"""Measure cases and write evaluation reports (numpy only: no torch, no image I/O).

Shared by ``segmenter evaluate`` (files) and training's validation (arrays in memory):

- :func:`measure_case`: voxel metrics per label and lesion metrics on the foreground (every
  label > 0 together: a lesion is a lesion whatever its class);
- :func:`summarise`: nnU-Net's ``summary.json`` schema (``metric_per_case``, ``mean``,
  ``foreground_mean``) plus a ``lesion`` block per case and overall: NaN-aware means that say
  how many cases they cover, and ``pooled`` lesion counts summed over cases;
- :func:`lesions_csv_text`: ``lesions.csv``, one row per reference and per predicted lesion;
- :func:`format_table`: the compact table the CLI prints;
- :func:`summary_json`, :func:`write_report`: strict JSON (NaN as null), written atomically.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.atomic import write_text
from segmenter.evaluation import metrics

VOXEL_KEYS = ("Dice", "IoU", "precision", "recall", "HD95", "volume_diff_ml")
COUNT_KEYS = ("TP", "FP", "FN", "TN", "n_pred", "n_ref")
LESION_KEYS = ("recall", "precision", "f1", "lesion_dice", "fp_per_case", "count_diff")
LESION_COUNT_KEYS = ("n_ref", "n_pred", "tp", "fp", "fn", "tp_pred")
# Preset-specific keys, averaged when the preset reports them.
LESION_EXTRA_KEYS = ("RQ", "SQ", "PQ", "lesion_hd95", "lesionwise_dice", "lesionwise_hd95")


@dataclass(frozen=True)
class CasePair:
    """A prediction and its reference, paired by case id."""

    case_id: str
    prediction: Path
    reference: Path


@dataclass(frozen=True)
class CaseResult:
    """Everything measured on one case."""

    pair: CasePair
    metrics: dict[str, dict[str, float]]
    lesion: dict[str, Any]
    lesions: list[metrics.LesionRecord]
    affine: np.ndarray


def _foreground_values(labels: np.ndarray) -> set[int]:
    """Label values > 0 present in a non-negative integer label map, without a full sort."""
    top = int(labels.max(initial=0))
    if top <= 32:  # the usual case: a few classes, one cheap pass each
        return {v for v in range(1, top + 1) if (labels == v).any()}
    counts = np.bincount(labels.ravel(order="K"))
    return {int(v) for v in np.flatnonzero(counts) if v > 0}


def measure_case(
    pair: CasePair,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    affine: np.ndarray,
    rule: metrics.LesionRule,
    size_bins_mm3: Sequence[float],
    labels: Sequence[int] | None = None,
) -> CaseResult:
    """Measure one case from label arrays.

    Args:
        pair: the case id and the files it came from (for the report).
        pred: ``(X, Y, Z)`` non-negative integer predicted labels.
        ref: ``(X, Y, Z)`` reference labels, same shape.
        spacing: voxel size in mm.
        affine: 4x4 voxel-to-RAS matrix (lesion centroids in mm).
        rule: lesion matching rule (a preset from ``metrics.PRESETS``).
        size_bins_mm3: edges of the lesion-size bins.
        labels: label values to report voxel metrics for; None = every value > 0 in either map.
    """
    if labels is None:
        labels = sorted(_foreground_values(ref) | _foreground_values(pred)) or [1]
    per_label = {
        str(lab): metrics.voxel_metrics(pred == lab, ref == lab, spacing) for lab in labels
    }
    lesion = metrics.lesion_metrics(
        pred > 0, ref > 0, spacing, rule=rule, size_bins_mm3=tuple(size_bins_mm3)
    )
    return CaseResult(pair, per_label, dict(lesion.summary), list(lesion.lesions), affine)


def nan_mean(values: Iterable[float | None]) -> tuple[float, int]:
    """Mean of the values that are not None or NaN, and how many there were (NaN if none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return (float(np.mean(vals)) if vals else float("nan"), len(vals))


def _average(blocks: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key in keys:
        present = [b[key] for b in blocks if key in b]
        if not present:
            continue
        out[key], counts[key] = nan_mean(present)
    out["n_cases"] = counts
    return out


def _recall_by_size_mean(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    bins: dict[str, list[float]] = {}
    for b in blocks:
        for name, entry in b.get("recall_by_size", {}).items():
            bins.setdefault(name, []).append(entry["recall"])
    result = {}
    for name, vals in bins.items():
        mean, n = nan_mean(vals)
        result[name] = {"recall": mean, "n_cases": n}
    return result


def _pooled(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Lesion counts summed over cases (micro average): what a lesion-level reader sees."""
    tot = {k: int(sum(b.get(k, 0) for b in blocks)) for k in LESION_COUNT_KEYS}
    n_ref, n_pred, tp, fp, fn, tp_pred = (tot[k] for k in LESION_COUNT_KEYS)
    pooled: dict[str, Any] = dict(tot)
    pooled["recall"] = tp / n_ref if n_ref else float("nan")
    pooled["precision"] = tp_pred / n_pred if n_pred else float("nan")
    denom = tp + 0.5 * (fp + fn)
    pooled["f1"] = tp / denom if denom else float("nan")
    bins: dict[str, dict[str, float]] = {}
    for b in blocks:
        for name, entry in b.get("recall_by_size", {}).items():
            acc = bins.setdefault(name, {"n": 0, "detected": 0})
            acc["n"] += int(entry["n"])
            acc["detected"] += int(entry["detected"])
    for acc in bins.values():
        acc["recall"] = acc["detected"] / acc["n"] if acc["n"] else float("nan")
    pooled["recall_by_size"] = bins
    return pooled


def summarise(
    results: list[CaseResult], rule_name: str, rule: metrics.LesionRule
) -> dict[str, Any]:
    """Build the ``summary.json`` structure (nnU-Net schema plus lesion blocks)."""
    per_case = [
        {
            "case_id": r.pair.case_id,
            "prediction_file": str(r.pair.prediction),
            "reference_file": str(r.pair.reference),
            "metrics": r.metrics,
            "lesion": r.lesion,
        }
        for r in results
    ]
    labels = sorted({lab for r in results for lab in r.metrics}, key=int)
    mean = {
        lab: _average(
            [r.metrics[lab] for r in results if lab in r.metrics], VOXEL_KEYS + COUNT_KEYS
        )
        for lab in labels
    }
    fg_keys = VOXEL_KEYS + COUNT_KEYS
    foreground_mean = {
        key: float(np.nanmean([mean[lab][key] for lab in labels]))
        if any(not math.isnan(mean[lab].get(key, float("nan"))) for lab in labels)
        else float("nan")
        for key in fg_keys
    }
    lesion_blocks = [r.lesion for r in results]
    lesion_keys = (
        LESION_KEYS
        + LESION_COUNT_KEYS
        + tuple(k for k in LESION_EXTRA_KEYS if any(k in b for b in lesion_blocks))
    )
    lesion_mean = _average(lesion_blocks, lesion_keys)
    lesion_mean["recall_by_size"] = _recall_by_size_mean(lesion_blocks)
    lesion_mean["pooled"] = _pooled(lesion_blocks)
    return {
        "metric_per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground_mean,
        "lesion": lesion_mean,
        "n_cases": len(results),
        "preset": rule_name,
        "lesion_rule": metrics.rule_to_dict(rule),
        "empty_policy": metrics.EMPTY_POLICY,
    }


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf by JSON-compatible values: NaN -> null (as json.dumps cannot do strictly)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def lesions_csv_text(results: list[CaseResult]) -> str:
    """One row per reference and per predicted lesion (centroids in RAS mm and voxels)."""
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "case_id", "source", "lesion_id", "volume_mm3", "centroid_x_mm", "centroid_y_mm",
            "centroid_z_mm", "centroid_i", "centroid_j", "centroid_k", "matched_ids", "dice",
            "status",
        ]
    )  # fmt: skip
    for r in results:
        for les in r.lesions:
            vox = np.asarray(les.centroid_vox, dtype=np.float64)
            world = (r.affine @ np.append(vox, 1.0))[:3]
            writer.writerow(
                [
                    r.pair.case_id, les.source, les.id, f"{les.volume_mm3:.3f}",
                    *(f"{w:.2f}" for w in world), *(f"{v:.2f}" for v in vox),
                    ";".join(str(m) for m in les.matched),
                    "" if math.isnan(les.dice) else f"{les.dice:.4f}", les.status,
                ]
            )  # fmt: skip
    return buf.getvalue()


def format_metric(value: Any, digits: int = 3, *, missing: str = "-") -> str:
    """A metric for a printed table: floats with ``digits`` decimals (``nan`` for NaN),
    ``missing`` for None, anything else as ``str``."""
    if value is None:
        return missing
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(summary: dict[str, Any], max_rows: int = 30) -> str:
    """Compact text table: one row per case (voxel Dice on the foreground, lesion counts)."""
    fmt = format_metric
    head = ("case", "Dice", "HD95mm", "ref", "pred", "TP", "FP", "FN", "recall", "prec", "F1")
    rows: list[tuple[str, ...]] = []
    for entry in summary["metric_per_case"]:
        dice = [m["Dice"] for m in entry["metrics"].values()]
        hd = [m["HD95"] for m in entry["metrics"].values()]
        les = entry["lesion"]
        rows.append(
            (
                entry["case_id"], fmt(nan_mean(dice)[0]), fmt(nan_mean(hd)[0], 1),
                str(les["n_ref"]), str(les["n_pred"]), str(les["tp"]), str(les["fp"]),
                str(les["fn"]), fmt(les["recall"]), fmt(les["precision"]), fmt(les["f1"]),
            )
        )  # fmt: skip
    if len(rows) > max_rows:
        rows = rows[: max_rows - 1] + [("...",) + ("",) * (len(head) - 1)]
    fg = summary["foreground_mean"]
    les = summary["lesion"]
    pooled = les["pooled"]
    rows.append(
        (
            "mean", fmt(fg["Dice"]), fmt(fg["HD95"], 1), fmt(les["n_ref"], 1),
            fmt(les["n_pred"], 1), fmt(les["tp"], 1), fmt(les["fp"], 1), fmt(les["fn"], 1),
            fmt(les["recall"]), fmt(les["precision"]), fmt(les["f1"]),
        )
    )  # fmt: skip
    rows.append(
        (
            "pooled", "", "", str(pooled["n_ref"]), str(pooled["n_pred"]), str(pooled["tp"]),
            str(pooled["fp"]), str(pooled["fn"]), fmt(pooled["recall"]),
            fmt(pooled["precision"]), fmt(pooled["f1"]),
        )
    )  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    lines = [line(head)]
    for r in rows:
        if r[0] == "mean":
            lines.append("-" * len(lines[0]))
        lines.append(line(r))
    bins = pooled["recall_by_size"]
    if bins:
        parts = [
            f"{name}: {fmt(b['recall'], 2)} ({int(b['detected'])}/{int(b['n'])})"
            for name, b in bins.items()
        ]
        lines.append("lesion recall by size (mm3, pooled): " + ", ".join(parts))
    return "\n".join(lines)


def summary_json(summary: dict[str, Any]) -> str:
    """``summary.json`` text: strict JSON, NaN written as null and infinities as strings."""
    return json.dumps(json_safe(summary), indent=2, allow_nan=False)


def write_report(results: list[CaseResult], summary: dict[str, Any], out_dir: str | Path) -> None:
    """Write ``summary.json`` (NaN as null) and ``lesions.csv`` into ``out_dir`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "lesions.csv", lesions_csv_text(results))
    write_text(out / "summary.json", summary_json(summary))
