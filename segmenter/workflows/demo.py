"""``segmenter demo``: synthetic phantoms -> train (focal + Dice) -> predict -> evaluate.

Everything lands under ``--out``: ``data/`` (the phantom dataset), ``run/`` (the run folder),
``predictions/`` (test masks) and ``evaluation/`` (``summary.json``, ``lesions.csv``). The
training gets what is left of the budget after the data, the predictions and the evaluation
(measured on these machines: about a tenth of it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from segmenter.config import Config, config_from_dict

log = logging.getLogger(__name__)

DEMO_TRAIN_CASES = 24
DEMO_TEST_CASES = 8
DEMO_SIZE = 64
# Share of the budget kept for synthesis, preprocessing, prediction and evaluation.
OVERHEAD_FRACTION = 0.12


def demo_config(dataset: Path | str, minutes: float, seed: int = 0) -> Config:
    """The demo's experiment config (``configs/demo.yaml`` holds the same, for reading)."""
    values: dict[str, Any] = {
        "data": {
            "dataset": str(dataset),
            "patch_size": [48, 48, 48],
            "batch_size": 2,
            "foreground_fraction": 0.67,
            "sampling": "lesion",
            "num_workers": 0,
        },
        "model": {"depth": 4, "base_filters": 8, "max_filters": 64},
        "loss": {
            "name": "focal_dice",
            "gamma": 2.0,
            "lambda_focal": 1.0,
            "lambda_dice": 1.0,
            "batch_dice": True,
        },  # fmt: skip
        "train": {
            "seed": seed,
            "lr": 3e-3,
            "epochs": 1000,
            "iterations_per_epoch": 50,
            "max_minutes": minutes * (1.0 - OVERHEAD_FRACTION),
            "val_every": 2,
            "n_folds": 4,
            "threads": 2,
        },
        "inference": {"threshold": 0.5, "sw_batch_size": 4},
    }
    return config_from_dict(values)


def run_demo(
    out: Path,
    *,
    minutes: float = 5.0,
    seed: int = 0,
    n_train: int = DEMO_TRAIN_CASES,
    n_test: int = DEMO_TEST_CASES,
    size: int = DEMO_SIZE,
) -> dict[str, Any]:
    """Run the whole demo; print where everything is and the lesion-level results.

    Args:
        out: output folder.
        minutes: whole budget; training gets what synthesis leaves, less a reserve for
            prediction and evaluation.
        seed: seeds the phantoms and the training.
        n_train: training phantoms (4 folds: a quarter of them validate).
        n_test: held-out test phantoms.
        size: phantom edge in voxels.

    Returns:
        The evaluation summary (``summary.json``'s content).
    """
    from segmenter.data import synthetic
    from segmenter.evaluation import evaluate, report
    from segmenter.inference.predict import PredictOptions, predict_all
    from segmenter.inference.predictor import load_predictor
    from segmenter.training import loop

    start = time.perf_counter()
    out = Path(out)
    spec = synthetic.PhantomSpec(size=size, channels=2)
    dataset = synthetic.write_dataset(
        out / "data", n_train, seed, spec, n_test=n_test, overwrite=True, progress=True
    )
    print(f"synthetic data: {n_train} training + {n_test} test cases in {dataset}")
    used = (time.perf_counter() - start) / 60.0
    cfg = demo_config(dataset, max(minutes - used, 0.05), seed)
    run_dir = out / "run"
    if (run_dir / "checkpoints" / "last.pt").exists():
        import shutil

        shutil.rmtree(run_dir)
    result = loop.fit(cfg, run_dir, fold=0, progress=True)
    print(
        f"trained {result.epochs} epochs ({result.steps} steps) in {result.seconds / 60:.1f} min; "
        f"best validation lesion F1 {result.best_metric:.3f} (moving average; epoch "
        f"{result.best_epoch})"
    )
    predictor = load_predictor(run_dir)
    preds = predict_all(predictor, [dataset / "imagesTs"], out / "predictions", PredictOptions())
    per_case = sum(p.seconds for p in preds) / max(len(preds), 1)
    summary = evaluate.evaluate_folders(
        out / "predictions", dataset / "labelsTs", out_dir=out / "evaluation"
    )
    print(report.format_table(summary))
    pooled = summary["lesion"]["pooled"]
    print(
        f"held-out phantoms: lesion recall {pooled['recall']:.3f}, lesion precision "
        f"{pooled['precision']:.3f}, lesion F1 {pooled['f1']:.3f}, Dice "
        f"{summary['foreground_mean']['Dice']:.3f} ({per_case:.1f} s per case with TTA; "
        f"{(time.perf_counter() - start) / 60:.1f} min in all)"
    )
    print(
        f"run folder {run_dir}, predictions {out / 'predictions'}, evaluation "
        f"{out / 'evaluation' / 'summary.json'}"
    )
    return summary
