"""Compare settings: several trainings that differ only in the keys a variant sets.

Every variant trains on the same data, split (the same fold of the same seeded ``splits.json``),
seed and wall-clock budget, and is scored on the same held-out cases with ``evaluate``'s
summary: the dataset's test cases (``imagesTs`` with ``labelsTs``) when it has them, else the
fold's validation cases. ``comparison.csv`` holds one row per variant and case. A finished variant
(its ``summary.json`` written) is skipped on a rerun, so an interrupted comparison resumes.

Variants file (YAML)::

    variants:
      dice:        {loss.name: dice}
      bce:         {loss.name: focal, loss.gamma: 0.0}
      focal_dice:  {}                      # the base config as it is
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.atomic import copy_file, write_text
from segmenter.config import Config, ConfigError, apply_values, read_yaml, save_config
from segmenter.data.layout import Case, Dataset
from segmenter.errors import InputError
from segmenter.evaluation.report import nan_mean, summary_json
from segmenter.locking import FolderLock

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "variant", "case_id", "dice", "hd95_mm", "lesion_recall", "lesion_precision", "lesion_f1",
    "lesion_dice", "n_ref", "n_pred", "tp", "fp", "fn", "train_minutes", "epochs", "steps",
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One setting to compare: a name and the dotted keys it changes."""

    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class VariantResult:
    """A finished variant: its folder, its evaluation summary and whether this call trained it."""

    variant: Variant
    folder: Path
    summary: dict[str, Any]
    trained_now: bool


def load_variants(path: str | Path, base: Config) -> list[Variant]:
    """Read a variants file and check every variant against ``base`` (keys and types).

    Raises:
        InputError: missing or malformed file, an unknown key or a wrongly typed value (one line
            naming the variant).
    """
    p = Path(path)
    data = read_yaml(p, "variants")
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
        raise InputError(f"{p}: expected a mapping 'variants: {{name: {{key: value}}}}'")
    variants = []
    for name, values in data["variants"].items():
        values = values or {}
        if not isinstance(values, dict):
            raise InputError(f"{p}: variant '{name}' must map dotted keys to values")
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise InputError(f"{p}: variant name '{name}' must be letters, digits, - or _")
        try:
            apply_values(base, values)
        except ConfigError as exc:
            raise InputError(f"{p}: variant '{name}': {exc}") from None
        variants.append(Variant(str(name), {str(k): v for k, v in values.items()}))
    if not variants:
        raise InputError(f"{p}: no variants")
    return variants


def variant_config(base: Config, variant: Variant, minutes: float | None) -> Config:
    """The base config with the variant's keys set (and the shared budget, when given)."""
    values = dict(variant.values)
    if minutes is not None:
        values["train.max_minutes"] = float(minutes)
    return apply_values(base, values)


def _summary_path(folder: Path) -> Path:
    return folder / "evaluation" / "summary.json"


def run_variant(
    base: Config, variant: Variant, out: Path, *, minutes: float | None, progress: bool
) -> VariantResult:
    """Train, predict and evaluate one variant (or load its finished result)."""
    folder = out / "variants" / variant.name
    done = _summary_path(folder)
    if done.is_file():
        log.info("variant %s: finished before, skipped", variant.name)
        return VariantResult(variant, folder, json.loads(done.read_text()), False)
    from segmenter.data.layout import load_dataset
    from segmenter.data.splits import resolve_dataset
    from segmenter.evaluation import evaluate
    from segmenter.inference.predict import PROBABILITY_FOLDER, PredictOptions, predict_case
    from segmenter.inference.predictor import load_predictor
    from segmenter.training import loop

    cfg = variant_config(base, variant, minutes)
    run = folder / "run"
    resume = (run / "checkpoints" / "last.pt").is_file()
    result = loop.fit(cfg, run, fold=0, resume=resume, progress=progress)
    dataset = load_dataset(resolve_dataset(cfg))
    cases, held_out = held_out_cases(dataset, run)
    predictor = load_predictor(run)
    predictions, reference = folder / "predictions", folder / "reference"
    options = PredictOptions(save_probabilities=True)
    for case in cases:
        assert case.label is not None
        name = f"{case.case_id}{dataset.file_ending}"
        predict_case(predictor, case, predictions / name, options)
        copy_file(case.label, reference / name)
    listing = {c.case_id: {"images": [str(p) for p in c.images], "label": str(c.label)}
               for c in cases}  # fmt: skip
    write_text(folder / "held_out.json", json.dumps(listing, indent=2))
    points = froc_points(predictions / PROBABILITY_FOLDER, reference, cfg)
    write_text(folder / "froc.json", json.dumps(points, indent=2))
    summary = evaluate.evaluate_folders(
        predictions, reference, preset=cfg.evaluation.preset,
        size_bins_mm3=cfg.evaluation.size_bins_mm3, out_dir=folder / "evaluation",
    )  # fmt: skip
    summary["held_out"] = held_out
    summary["training"] = {
        "minutes": result.seconds / 60.0, "epochs": result.epochs, "steps": result.steps,
    }  # fmt: skip
    save_config(cfg, folder / "config.yaml")
    text = summary_json(summary)
    write_text(done, text)
    return VariantResult(variant, folder, json.loads(text), True)


def held_out_cases(dataset: Dataset, run: Path) -> tuple[list[Case], str]:
    """The cases every variant is scored on, and how to name them in the summary.

    The dataset's labelled test cases (``imagesTs`` with ``labelsTs``) when it has them, else
    the validation cases of fold 0 in ``run/splits.json`` (the same for every variant: same
    cases, seed and number of folds).
    """
    test = [c for c in dataset.test if c.label is not None]
    if test and len(test) == len(dataset.test):
        return test, "test cases (imagesTs/labelsTs)"
    split = json.loads((run / "splits.json").read_text())
    fold = split[0] if isinstance(split, list) else split
    by_id = {c.case_id: c for c in dataset.training}
    return [by_id[i] for i in fold["val"]], "validation cases of fold 0"


FROC_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


def froc_points(prob_dir: Path, label_dir: Path, cfg: Config) -> list[dict[str, float]]:
    """Lesion recall and false-positive lesions per case over thresholds (FROC-style).

    Args:
        prob_dir: probability maps ``{case}.nii.gz`` (float32 in [0, 1]).
        label_dir: reference label maps with the same names.
        cfg: lesion rule (``evaluation.preset``) and minimum lesion size.

    Returns:
        One point per threshold: ``threshold``, ``recall`` (pooled), ``fp_per_case``.
    """
    from segmenter.evaluation import metrics, tuning
    from segmenter.io import read_image

    rule = metrics.PRESETS[cfg.evaluation.preset]
    probs, refs, spacings = [], [], []
    for prob_path in sorted(prob_dir.iterdir()):
        ref_path = label_dir / prob_path.name
        if ref_path.is_file():
            prob = read_image(prob_path)
            probs.append(prob.array)
            refs.append(read_image(ref_path).array > 0)
            spacings.append(prob.spacing)
    points = []
    for thr in FROC_THRESHOLDS:
        masks = tuning.masks_at(probs, spacings, thr, cfg.inference.min_lesion_mm3)
        c = tuning.lesion_counts(masks, refs, spacings, rule)
        points.append({
            "threshold": thr,
            "recall": c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else math.nan,
            "fp_per_case": c["fp"] / len(probs) if probs else math.nan,
        })  # fmt: skip
    return points


def write_plots(results: list[VariantResult], rows: list[dict[str, Any]], out: Path) -> None:
    """The comparison's PNGs: recall by size, Dice/F1 spread, FROC, training curves."""
    from segmenter import plots

    plots.close(
        plots.recall_by_size(
            {r.variant.name: r.summary["lesion"]["pooled"]["recall_by_size"] for r in results},
            path=out / "recall_by_size.png",
        )
    )
    plots.close(plots.metric_spread(rows, path=out / "dice_f1_per_variant.png"))
    curves = {
        r.variant.name: json.loads((r.folder / "froc.json").read_text())
        for r in results
        if (r.folder / "froc.json").is_file()
    }
    if curves:
        plots.close(plots.froc(curves, path=out / "froc.png"))
    _overlay(results, out)
    histories = {}
    for r in results:
        metrics_csv = r.folder / "run" / "metrics.csv"
        if metrics_csv.is_file():
            with open(metrics_csv, newline="") as f:
                histories[r.variant.name] = list(csv.DictReader(f))
    if histories:
        plots.close(plots.training_curves(histories, path=out / "training_curves.png"))


def _overlay(results: list[VariantResult], out: Path) -> None:
    """Slice overlay of the first held-out case with lesions: its first channel, the
    reference and every variant's prediction on the slice with the most lesion voxels."""
    from segmenter import plots
    from segmenter.io import read_image

    first = results[0].summary["metric_per_case"] if results else []
    case = next((c for c in first if (c["lesion"].get("n_ref") or 0) > 0), None)
    listing = results[0].folder / "held_out.json" if results else None
    if case is None or listing is None or not listing.is_file():
        return
    ref_path = Path(case["reference_file"])
    scans = json.loads(listing.read_text()).get(case["case_id"], {}).get("images", [])
    if not ref_path.is_file() or not scans or not Path(scans[0]).is_file():
        return
    ref = read_image(ref_path).array > 0
    k = int(np.argmax(ref.sum(axis=(0, 1))))  # the slice with the most lesion voxels
    preds = {}
    for r in results:
        pred_path = r.folder / "predictions" / ref_path.name
        if pred_path.is_file():
            preds[r.variant.name] = read_image(pred_path).array[:, :, k] > 0
    scan = read_image(scans[0]).array[:, :, k]
    title = f"{case['case_id']}, slice {k}"
    fig = plots.slice_overlay(
        scan, ref[:, :, k], preds, title=title, path=out / "slice_overlay.png"
    )
    plots.close(fig)


def comparison_rows(results: Iterable[VariantResult]) -> list[dict[str, Any]]:
    """One row per variant and held-out case (voxel Dice of the foreground, lesion counts)."""
    rows = []
    for r in results:
        training = r.summary.get("training", {})
        for case in r.summary["metric_per_case"]:
            voxel = list(case["metrics"].values())
            les = case["lesion"]
            rows.append({
                "variant": r.variant.name,
                "case_id": case.get("case_id", Path(case["reference_file"]).name),
                "dice": nan_mean([m.get("Dice") for m in voxel])[0],
                "hd95_mm": nan_mean([m.get("HD95") for m in voxel])[0],
                "lesion_recall": les.get("recall"),
                "lesion_precision": les.get("precision"),
                "lesion_f1": les.get("f1"),
                "lesion_dice": les.get("lesion_dice"),
                "n_ref": les.get("n_ref"), "n_pred": les.get("n_pred"),
                "tp": les.get("tp"), "fp": les.get("fp"), "fn": les.get("fn"),
                "train_minutes": training.get("minutes"),
                "epochs": training.get("epochs"), "steps": training.get("steps"),
            })  # fmt: skip
    return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = _stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({
            k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
            for k, v in row.items()
        })  # fmt: skip
    return buf.getvalue()


def compare(
    base: Config,
    variants: list[Variant],
    out: str | Path,
    *,
    minutes: float | None = None,
    progress: bool = True,
    variant_progress: Callable[[Iterable[Variant], int], Iterable[Variant]] | None = None,
) -> list[VariantResult]:
    """Run every variant (skipping finished ones) and write ``OUT/comparison.csv``.

    Args:
        base: the shared config (data, split, seed, model...).
        variants: the settings to compare.
        out: comparison folder; each variant lives in ``OUT/variants/<name>/``.
        minutes: wall-clock training budget for each variant (``train.max_minutes``).
        progress: training progress bars.
        variant_progress: optional wrapper drawing a bar over variants.

    Returns:
        One result per variant, in the order given.
    """
    folder = Path(out)
    iterable: Iterable[Variant] = variants
    if variant_progress is not None:
        iterable = variant_progress(variants, len(variants))
    with FolderLock(folder, "compare"):
        save_config(base, folder / "base_config.yaml")
        start = time.perf_counter()
        results = [
            run_variant(base, variant, folder, minutes=minutes, progress=progress)
            for variant in iterable
        ]
        rows = comparison_rows(results)
        write_text(folder / "comparison.csv", _csv_text(rows))
        write_plots(results, rows, folder)
    log.info("compared %d variants in %.1f min", len(results), (time.perf_counter() - start) / 60)
    return results
