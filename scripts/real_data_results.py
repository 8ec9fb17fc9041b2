"""Real-data results: our cross-validation against the MONAI baseline, same split and budget.

1. ``segmenter crossval`` (``segmenter.workflows.crossval.run_crossval``) with the config, every
fold
   trained for ``--minutes`` of wall clock (``train.max_minutes``), out-of-fold predictions
   with mirroring TTA, threshold and minimum lesion size tuned on them;
2. ``scripts/baseline_monai.py`` on each fold's ``splits.json``, the same training cases, the
   same budget and the same patch size, scored by our ``evaluate`` with the config's preset;
3. one table over all out-of-fold cases: voxel Dice (mean over cases), pooled lesion recall,
   precision and F1, mean per-lesion Dice, recall by lesion size, prediction seconds per case,
   for ours before and after the out-of-fold tuning and for the baseline;
4. per case, side by side: voxel Dice and the number of predicted lesions of ours (tuned) and
   of the baseline, and on how many cases each is ahead.

    python scripts/real_data_results.py --config configs/ms_lesions.yaml --minutes 25 \\
        --out runs/results_ms

Runs resume: finished folds (ours and the baseline's) are kept. Prints what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from segmenter.config import load_config
from segmenter.evaluation.evaluate import evaluate_folders
from segmenter.evaluation.report import nan_mean
from segmenter.workflows.crossval import run_crossval

HERE = Path(__file__).resolve().parent


def _baseline_module() -> Any:
    spec = importlib.util.spec_from_file_location("baseline_monai", HERE / "baseline_monai.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name: str, summary: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    pooled = summary["lesion"]["pooled"]
    return {
        "pipeline": name,
        "dice": summary["foreground_mean"]["Dice"],
        "recall": pooled["recall"],
        "precision": pooled["precision"],
        "f1": pooled["f1"],
        "lesion_dice": summary["lesion"]["lesion_dice"],
        "by_size": {k: v["recall"] for k, v in pooled["recall_by_size"].items()},
        "seconds": seconds,
    }


def _fmt(value: Any) -> str:
    return "  nan" if value is None or value != value else f"{value:.3f}"


def _case_dice(case: dict[str, Any]) -> float:
    """A case's voxel Dice, the mean over its foreground labels (NaN ones left out)."""
    return nan_mean(m.get("Dice") for m in case["metrics"].values())[0]


def _cells(case: dict[str, Any] | None, width: int) -> tuple[str, float]:
    """A case's Dice and predicted-lesion count as fixed-width cells (``-`` when absent)."""
    if case is None:
        return f"{'-':>{width}}{'-':>8}", float("nan")
    dice = _case_dice(case)
    return f"{_fmt(dice):>{width}}{case['lesion']['n_pred']:>8}", dice


def per_case_lines(ours: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Side-by-side lines per case of two ``evaluate`` summaries: Dice and predicted lesions.

    Cases are matched by id; a case only one summary holds is listed with ``-`` for the other.
    The last line counts the cases where each is ahead on Dice by more than 0.005.
    """
    a = {c["case_id"]: c for c in ours["metric_per_case"]}
    b = {c["case_id"]: c for c in baseline["metric_per_case"]}
    lines = [f"{'case':<28}{'Dice ours':>10}{'lesions':>8}{'Dice base':>11}{'lesions':>8}"]
    ahead = behind = 0
    for case_id in sorted(a.keys() | b.keys()):
        cell_a, dice_a = _cells(a.get(case_id), 10)
        cell_b, dice_b = _cells(b.get(case_id), 11)
        if dice_a - dice_b > 0.005:  # False when either is NaN
            ahead += 1
        elif dice_b - dice_a > 0.005:
            behind += 1
        lines.append(f"{case_id:<28}{cell_a}{cell_b}")
    lines.append(f"Dice ahead by > 0.005: ours on {ahead} cases, the baseline on {behind}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--minutes", type=float, required=True, help="training budget per fold")
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", type=int, nargs="+", help="default: every fold")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    overrides = [f"train.max_minutes={args.minutes}", "train.epochs=100000", *args.set]
    cfg = load_config(args.config, overrides)

    ours = run_crossval(cfg, out / "ours", folds=args.folds, progress=False)
    post = ours.postprocessing

    baseline = _baseline_module()
    merged_pred, merged_ref = out / "baseline" / "predictions", out / "baseline" / "reference"
    base_seconds = []
    for k in ours.folds:
        fold_out = out / "baseline" / f"fold_{k}"
        done = fold_out / "evaluation" / "summary.json"
        if not done.is_file():
            t0 = time.perf_counter()
            baseline.main([
                "--dataset", cfg.data.dataset,
                "--splits", str(out / "ours" / f"fold_{k}" / "splits.json"), "--fold", str(k),
                "--minutes", str(args.minutes), "--out", str(fold_out),
                "--patch", *map(str, cfg.data.patch_size), "--preset", cfg.evaluation.preset,
            ])  # fmt: skip
            print(f"baseline fold {k}: {(time.perf_counter() - t0) / 60:.1f} min in all")
        timing = json.loads(done.read_text()).get("seconds_per_case")
        if timing is not None:
            base_seconds.append(timing)
        for sub, dest in (("predictions", merged_pred), ("reference", merged_ref)):
            dest.mkdir(parents=True, exist_ok=True)
            for f in (fold_out / sub).iterdir():
                shutil.copyfile(f, dest / f.name)
    bins = cfg.evaluation.size_bins_mm3
    base_summary = evaluate_folders(
        merged_pred, merged_ref, preset=cfg.evaluation.preset, size_bins_mm3=bins,
        out_dir=out / "baseline",
    )  # fmt: skip
    before = json.loads((out / "ours" / "oof" / "before" / "summary.json").read_text())
    seconds = post.get("seconds_per_case")
    rows = [
        _row(f"segmenter, threshold {post['before']['threshold']:.2f}, min "
             f"{post['before']['min_lesion_mm3']:g} mm3", before, seconds),
        _row(f"segmenter, OOF-tuned {post['threshold']:.2f} / {post['min_lesion_mm3']:g} mm3",
             ours.summary, seconds),
        _row("MONAI baseline (UNet, DiceCE)", base_summary,
             sum(base_seconds) / len(base_seconds) if base_seconds else None),
    ]  # fmt: skip
    n_cases = ours.summary["n_cases"]
    print(
        f"\n{args.config}: folds {ours.folds}, {n_cases} out-of-fold cases, {args.minutes:g} min "
        f"of training per fold for each pipeline, preset {cfg.evaluation.preset}"
    )
    head = (
        f"{'pipeline':<46}{'Dice':>7}{'recall':>8}{'prec':>7}{'F1':>7}{'lesDice':>9}{'s/case':>8}"
    )
    print(head)
    for r in rows:
        secs = "   nan" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(
            f"{r['pipeline']:<46}{_fmt(r['dice']):>7}{_fmt(r['recall']):>8}"
            f"{_fmt(r['precision']):>7}{_fmt(r['f1']):>7}{_fmt(r['lesion_dice']):>9}{secs:>8}"
        )
    print("lesion recall by size (mm3, pooled):")
    for r in rows:
        sizes = ", ".join(f"{k}: {_fmt(v)}" for k, v in r["by_size"].items())
        print(f"  {r['pipeline']:<44} {sizes}")
    print("per case, ours OOF-tuned against the baseline:")
    for line in per_case_lines(ours.summary, base_summary):
        print(f"  {line}")
    print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
