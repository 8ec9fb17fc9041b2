"""Minimum lesion size after the fact: a `segmenter compare` folder's held-out probability maps
scored at several `inference.min_lesion_mm3` values, per variant (no training, no prediction).

Every replicate of `compare` keeps the probability maps of its held-out cases
(`variants/<name>/<replicate>/predictions/probabilities/`) and the references beside them. This
script thresholds each map at the threshold its run chose (its `plan.json`, or `--threshold`),
removes the predicted lesions under each size of `--sizes`, and prints per variant and size:
mean voxel Dice over cases, pooled lesion recall, precision and F1, and false-positive lesions
per case under the base config's lesion rule (`evaluation.preset`).

    python scripts/postprocess_table.py runs/exp_brats_width --sizes 0 10 50 100 500

With `--reference NAME` it also pairs every variant with that one case by case at each size
(mean difference, bootstrap interval, sign-flip p-value: `segmenter.workflows.compare_stats`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from segmenter.config import load_config
from segmenter.evaluation import metrics, tuning
from segmenter.inference.predict import PROBABILITY_FOLDER
from segmenter.io import read_image
from segmenter.workflows.compare_stats import statistics_lines, variant_statistics


def _replicates(folder: Path) -> dict[str, list[Path]]:
    by_variant: dict[str, list[Path]] = {}
    for summary in sorted(folder.glob("variants/*/*/evaluation/summary.json")):
        rep = summary.parents[1]
        by_variant.setdefault(rep.parent.name, []).append(rep)
    return by_variant


def _load(
    rep: Path,
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[float, ...]], list[str]]:
    probs, refs, spacings, names = [], [], [], []
    for prob_path in sorted((rep / "predictions" / PROBABILITY_FOLDER).glob("*.nii.gz")):
        ref_path = rep / "reference" / prob_path.name
        if ref_path.is_file():
            prob = read_image(prob_path)
            probs.append(prob.array)
            refs.append(read_image(ref_path).array > 0)
            spacings.append(tuple(prob.spacing))
            names.append(prob_path.name)
    return probs, refs, spacings, names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a segmenter compare output folder")
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.0, 10.0, 50.0, 100.0, 500.0])
    ap.add_argument("--threshold", type=float, help="instead of each run's own threshold")
    ap.add_argument(
        "--reference", help="variant to pair the others with, case by case, at each size"
    )
    args = ap.parse_args(argv)
    base = args.folder / "base_config.yaml"
    if not base.is_file():
        print(f"error: {args.folder}: no base_config.yaml (not a compare folder)", file=sys.stderr)
        return 2
    cfg = load_config(base)
    rule = metrics.PRESETS[cfg.evaluation.preset]
    print(f"lesion rule {cfg.evaluation.preset}; sizes in mm3")
    print(f"{'variant':<12} {'min':>6} {'thr':>5} {'Dice':>6} {'recall':>7} {'prec':>6} "
          f"{'F1':>6} {'FP/case':>8} {'cases':>5}")  # fmt: skip
    case_rows: dict[float, list[dict[str, object]]] = {size: [] for size in args.sizes}
    for name, reps in _replicates(args.folder).items():
        loaded = []
        for rep in reps:
            plan = json.loads((rep / "run" / "plan.json").read_text())
            thr = args.threshold if args.threshold is not None else float(plan["threshold"])
            summary = json.loads((rep / "evaluation" / "summary.json").read_text())
            loaded.append((thr, summary["replicate"], *_load(rep)))
        for size in args.sizes:
            dices, n = [], 0
            total = dict.fromkeys(("tp", "fp", "fn", "tp_pred", "n_pred"), 0)
            for thr, replicate, probs, refs, spacings, names in loaded:
                masks = tuning.masks_at(probs, spacings, thr, size)
                for m, r, sp, case in zip(masks, refs, spacings, names, strict=True):
                    c = metrics.lesion_metrics(m, r, sp, rule=rule).summary  # once per case
                    for key in total:
                        total[key] += c[key]
                    dices.append(metrics.dice(m, r))
                    if args.reference:
                        denom = 2 * c["tp"] + c["fp"] + c["fn"]
                        case_rows[size].append({
                            "variant": name, "fold": replicate["fold"],
                            "seed": replicate["seed"], "case_id": case, "dice": dices[-1],
                            "lesion_f1": 2 * c["tp"] / denom if denom else math.nan,
                            "tp": c["tp"], "fp": c["fp"], "fn": c["fn"],
                        })  # fmt: skip
                n += len(masks)
            tp, fp, fn = total["tp"], total["fp"], total["fn"]
            recall = tp / (tp + fn) if tp + fn else math.nan
            # evaluate's pooled precision: matched predicted lesions over predicted lesions
            prec = total["tp_pred"] / total["n_pred"] if total["n_pred"] else math.nan
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
            dice = float(np.nanmean(dices)) if dices else math.nan
            thr_text = "/".join(sorted({f"{t:.2f}" for t, *_ in loaded}))
            print(f"{name:<12} {size:>6g} {thr_text:>5} {dice:>6.3f} {recall:>7.3f} {prec:>6.3f} "
                  f"{f1:>6.3f} {fp / n if n else math.nan:>8.2f} {n:>5}")  # fmt: skip
    if args.reference:
        for size, rows in case_rows.items():
            print(f"paired with {args.reference}, min {size:g} mm3 (per case):")
            for line in statistics_lines(variant_statistics(rows, args.reference)):
                print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
