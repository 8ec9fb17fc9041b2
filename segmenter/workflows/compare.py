"""Compare settings: several trainings that differ only in the keys a variant sets.

Every variant trains on the same data, split (the same folds of the same seeded
``splits.json``), seeds and wall-clock budget, and is scored on the same held-out cases with
``evaluate``'s summary: the dataset's test cases (``imagesTs`` with ``labelsTs``) when it has
them, else each fold's validation cases. A **replicate** is one training of a variant: one fold
(``folds``, default fold 0) and one seed (``seeds``, default the config's ``train.seed``); it
lives in ``OUT/variants/<name>/fold<F>_seed<S>/``. ``comparison.csv`` holds one row per variant,
replicate and case; ``statistics.csv`` the mean and spread of each variant over its replicates
and its paired difference to the reference variant over the same cases
(:mod:`segmenter.workflows.compare_stats`). A finished replicate (its ``summary.json`` written)
is skipped on a rerun, so an interrupted comparison resumes.

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
from collections.abc import Callable, Iterable, Sequence
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
from segmenter.workflows.compare_stats import statistics_csv, variant_statistics

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "variant", "fold", "seed", "case_id", "dice", "hd95_mm", "lesion_recall", "lesion_precision",
    "lesion_f1", "lesion_dice", "n_ref", "n_pred", "tp", "fp", "fn", "train_minutes", "epochs",
    "steps",
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One setting to compare: a name and the dotted keys it changes."""

    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Replicate:
    """One training of a variant: the fold it holds out and the seed it runs with (None: the
    variant's own ``train.seed``)."""

    fold: int
    seed: int | None

    @property
    def name(self) -> str:
        return f"fold{self.fold}_seed{self.seed}"


@dataclass(frozen=True)
class VariantResult:
    """A finished replicate of a variant: its folder, its evaluation summary, which fold and
    seed, and whether this call trained it."""

    variant: Variant
    folder: Path
    summary: dict[str, Any]
    trained_now: bool
    replicate: Replicate = Replicate(0, 0)


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


def variant_config(
    base: Config, variant: Variant, minutes: float | None, seed: int | None = None
) -> Config:
    """The base config with the variant's keys set (and the shared budget and the replicate's
    seed, when given)."""
    values = dict(variant.values)
    if minutes is not None:
        values["train.max_minutes"] = float(minutes)
    if seed is not None:
        values["train.seed"] = int(seed)
        values.setdefault("train.split_seed", base.train.resolved_split_seed)
    return apply_values(base, values)


def replicates(
    base: Config, variants: list[Variant], folds: Iterable[int] | None, seeds: Iterable[int] | None
) -> list[Replicate]:
    """The (fold, seed) pairs every variant runs, folds outer.

    Raises:
        InputError: a fold outside ``train.n_folds``, a repeated fold or seed, or seeds given
            while a variant sets ``train.seed`` itself.
    """
    fold_list = [0] if folds is None else list(folds)
    seed_list: list[int | None] = [None] if seeds is None else list(seeds)
    n_folds = base.train.n_folds
    for name, values in (("fold", fold_list), ("seed", seed_list)):
        if len(set(values)) != len(values):
            raise InputError(f"compare: a {name} is given twice: {values}")
    if not fold_list or any(not 0 <= f < n_folds for f in fold_list):
        raise InputError(
            f"compare: folds must be in 0..{n_folds - 1} (train.n_folds), got {fold_list}"
        )
    if not seed_list:
        raise InputError("compare: no seeds given")
    fixed = [v.name for v in variants if "train.seed" in v.values]
    if seeds is not None and fixed:
        raise InputError(f"compare: --seeds given but variant(s) {fixed} set train.seed")
    return [Replicate(f, s) for f in fold_list for s in seed_list]


#: A replicate's training is finished: its epochs, steps and minutes.
TRAINED_FILE = "trained.json"


def _summary_path(folder: Path) -> Path:
    return folder / "evaluation" / "summary.json"


def replicate_folder(out: Path, variant: Variant, replicate: Replicate) -> Path:
    """``OUT/variants/<name>/fold<F>_seed<S>``."""
    return out / "variants" / variant.name / replicate.name


def run_variant(
    base: Config,
    variant: Variant,
    out: Path,
    *,
    minutes: float | None,
    progress: bool,
    replicate: Replicate | None = None,
) -> VariantResult:
    """Train, predict and evaluate one replicate of a variant (or load its finished result).

    ``replicate`` None: fold 0 with the variant's own seed. The result names the seed used."""
    replicate = replicate or Replicate(0, None)
    cfg = variant_config(base, variant, minutes, replicate.seed)
    replicate = Replicate(replicate.fold, cfg.train.seed)
    folder = replicate_folder(out, variant, replicate)
    done = _summary_path(folder)
    if done.is_file():
        log.info("variant %s %s: finished before, skipped", variant.name, replicate.name)
        return VariantResult(variant, folder, json.loads(done.read_text()), False, replicate)
    from segmenter.data.layout import load_dataset
    from segmenter.data.splits import resolve_dataset
    from segmenter.evaluation import evaluate
    from segmenter.inference.predict import PROBABILITY_FOLDER, PredictOptions, predict_case
    from segmenter.inference.predictor import load_predictor
    from segmenter.training import loop

    run = folder / "run"
    trained = folder / TRAINED_FILE
    if trained.is_file():  # trained before (e.g. by compare --devices): predict and score only
        training = json.loads(trained.read_text())
    else:
        resume = (run / "checkpoints" / "last.pt").is_file()
        result = loop.fit(cfg, run, fold=replicate.fold, resume=resume, progress=progress)
        training = {"minutes": result.seconds / 60.0, "epochs": result.epochs,
                    "steps": result.steps}  # fmt: skip
        write_text(trained, json.dumps(training, indent=2))
    dataset = load_dataset(resolve_dataset(cfg))
    cases, held_out = held_out_cases(dataset, run, replicate.fold)
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
    summary["replicate"] = {"fold": replicate.fold, "seed": replicate.seed}
    summary["training"] = training
    save_config(cfg, folder / "config.yaml")
    text = summary_json(summary)
    write_text(done, text)
    return VariantResult(variant, folder, json.loads(text), True, replicate)


def held_out_cases(dataset: Dataset, run: Path, fold: int = 0) -> tuple[list[Case], str]:
    """The cases a replicate is scored on, and how to name them in the summary.

    The dataset's labelled test cases (``imagesTs`` with ``labelsTs``) when it has them, else
    the validation cases of ``fold`` in ``run/splits.json`` (the same for every variant: same
    cases, split seed and number of folds).
    """
    test = [c for c in dataset.test if c.label is not None]
    if test and len(test) == len(dataset.test):
        return test, "test cases (imagesTs/labelsTs)"
    split = json.loads((run / "splits.json").read_text())
    entry = split[fold] if isinstance(split, list) else split
    by_id = {c.case_id: c for c in dataset.training}
    return [by_id[i] for i in entry["val"]], f"validation cases of fold {fold}"


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


def _pooled_bins(results: list[VariantResult]) -> dict[str, dict[str, float]]:
    """Pooled recall by size over a variant's replicates (lesion counts summed per bin)."""
    bins: dict[str, dict[str, float]] = {}
    for r in results:
        for label, entry in r.summary["lesion"]["pooled"]["recall_by_size"].items():
            b = bins.setdefault(label, {"n": 0.0, "detected": 0.0})
            b["n"] += float(entry.get("n") or 0)
            b["detected"] += float(entry.get("detected") or 0)
    for b in bins.values():
        b["recall"] = b["detected"] / b["n"] if b["n"] else math.nan
    return bins


def _mean_froc(results: list[VariantResult]) -> list[dict[str, float]]:
    """A variant's FROC points averaged over its replicates, threshold by threshold."""
    curves = [
        json.loads((r.folder / "froc.json").read_text())
        for r in results
        if (r.folder / "froc.json").is_file()
    ]
    if not curves:
        return []
    return [
        {
            "threshold": points[0]["threshold"],
            "recall": float(np.nanmean([p["recall"] for p in points])),
            "fp_per_case": float(np.nanmean([p["fp_per_case"] for p in points])),
        }
        for points in zip(*curves, strict=True)
    ]


def by_variant(results: list[VariantResult]) -> dict[str, list[VariantResult]]:
    """Results grouped by variant name, in the order given."""
    groups: dict[str, list[VariantResult]] = {}
    for r in results:
        groups.setdefault(r.variant.name, []).append(r)
    return groups


def write_plots(results: list[VariantResult], rows: list[dict[str, Any]], out: Path) -> None:
    """The comparison's PNGs: recall by size, Dice/F1 spread, FROC and training curves (pooled
    or averaged over each variant's replicates), and the first replicates' slice overlay."""
    from segmenter import plots

    groups = by_variant(results)
    plots.close(
        plots.recall_by_size(
            {name: _pooled_bins(group) for name, group in groups.items()},
            path=out / "recall_by_size.png",
        )
    )
    plots.close(plots.metric_spread(rows, path=out / "dice_f1_per_variant.png"))
    curves = {name: _mean_froc(group) for name, group in groups.items()}
    curves = {name: points for name, points in curves.items() if points}
    if curves:
        plots.close(plots.froc(curves, path=out / "froc.png"))
    _overlay([group[0] for group in groups.values()], out)
    several = any(len(group) > 1 for group in groups.values())
    histories = {}
    for r in results:
        metrics_csv = r.folder / "run" / "metrics.csv"
        if metrics_csv.is_file():
            key = f"{r.variant.name} {r.replicate.name}" if several else r.variant.name
            with open(metrics_csv, newline="") as f:
                histories[key] = list(csv.DictReader(f))
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
    """One row per variant, replicate and held-out case (voxel Dice of the foreground, lesion
    counts)."""
    rows = []
    for r in results:
        training = r.summary.get("training", {})
        for case in r.summary["metric_per_case"]:
            voxel = list(case["metrics"].values())
            les = case["lesion"]
            rows.append({
                "variant": r.variant.name,
                "fold": r.replicate.fold,
                "seed": r.replicate.seed,
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


def _train_in_parallel(
    base: Config,
    pairs: Sequence[tuple[Variant, Replicate]],
    out: Path,
    *,
    minutes: float | None,
    devices: Sequence[str],
) -> None:
    """Train every replicate not trained yet as its own ``train`` process, one per device;
    each writes its ``trained.json``, so :func:`run_variant` then only predicts and scores."""
    from segmenter.workflows import parallel

    tasks, configs = [], []
    for variant, rep in pairs:
        cfg = variant_config(base, variant, minutes, rep.seed)
        folder = replicate_folder(out, variant, Replicate(rep.fold, cfg.train.seed))
        if _summary_path(folder).is_file() or (folder / TRAINED_FILE).is_file():
            continue
        save_config(cfg, folder / "config.yaml")
        tasks.append(parallel.TrainingTask(folder / "config.yaml", rep.fold, folder / "run"))
        configs.append(cfg)
    if not tasks:
        return
    threads_set = all(c.train.threads is not None for c in configs)
    log.info("training %d replicate(s) on devices %s", len(tasks), list(devices))
    for r in parallel.run_parallel(tasks, devices, threads_set=threads_set):
        training = {"minutes": r.minutes, "epochs": r.epochs, "steps": r.steps}
        write_text(r.task.run.parent / TRAINED_FILE, json.dumps(training, indent=2))


def compare(
    base: Config,
    variants: list[Variant],
    out: str | Path,
    *,
    minutes: float | None = None,
    folds: Iterable[int] | None = None,
    seeds: Iterable[int] | None = None,
    reference: str | None = None,
    devices: Sequence[str] | None = None,
    progress: bool = True,
    variant_progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> list[VariantResult]:
    """Run every variant on every replicate (skipping finished ones); write
    ``OUT/comparison.csv`` and ``OUT/statistics.csv``.

    Args:
        base: the shared config (data, split, seed, model...).
        variants: the settings to compare.
        out: comparison folder; each replicate lives in ``OUT/variants/<name>/fold<F>_seed<S>/``.
        minutes: wall-clock training budget for each replicate (``train.max_minutes``).
        folds: folds of the base config's split to train and score (default: fold 0).
        seeds: training seeds (default: ``train.seed``); the split stays the base config's.
        reference: the variant the others are compared with, case by case (default: the first).
        devices: train the replicates first, in parallel processes, one per device (CUDA
            indices or ``cpu``, :mod:`segmenter.workflows.parallel`); prediction and scoring
            then follow one after another. None: each replicate in turn in this process.
        progress: training progress bars.
        variant_progress: optional wrapper drawing a bar over the (variant, replicate) runs.

    Returns:
        One result per variant and replicate, variants in the order given, replicates folds
        first.

    Raises:
        InputError: bad folds or seeds, or a reference that names no variant.
    """
    folder = Path(out)
    reps = replicates(base, variants, folds, seeds)
    names = [v.name for v in variants]
    reference = names[0] if reference is None else reference
    if reference not in names:
        raise InputError(f"compare: reference variant '{reference}' is not one of {names}")
    pairs = [(v, rep) for v in variants for rep in reps]
    runs: Iterable[tuple[Variant, Replicate]] = pairs
    if devices:
        from segmenter.workflows.parallel import parse_devices

        devices = parse_devices(devices)
    if variant_progress is not None:
        runs = variant_progress(runs, len(variants) * len(reps))
    with FolderLock(folder, "compare"):
        save_config(base, folder / "base_config.yaml")
        start = time.perf_counter()
        if devices:
            _train_in_parallel(base, pairs, folder, minutes=minutes, devices=devices)
        results = [
            run_variant(base, v, folder, minutes=minutes, progress=progress, replicate=rep)
            for v, rep in runs
        ]
        rows = comparison_rows(results)
        write_text(folder / "comparison.csv", _csv_text(rows))
        stats = variant_statistics(rows, reference)
        write_text(folder / "statistics.csv", statistics_csv(stats))
        write_plots(results, rows, folder)
    log.info(
        "compared %d variants x %d replicates in %.1f min",
        len(variants), len(reps), (time.perf_counter() - start) / 60,
    )  # fmt: skip
    return results
