"""Inference settings on a trained run: seconds, Dice against the reference labels, agreement.

For each case of the run's dataset (``imagesTr`` with ``labelsTr``; all of them, or
``--cases``), preprocesses once and then predicts with every setting of the grid, in process,
one at a time: the sliding-window overlap (``--overlaps``, default 0.5 and 0.25) times the
mirroring (``--mirroring``, default all / single / none). Prints per setting the mean seconds
of the sliding window (preprocessing and writing excluded: they do not change), the mean
Dice against the labels (with the run's threshold, in the preprocessed grid) and the mean Dice
against the first setting's mask (nnU-Net's 0.5 with 8 flips by default). Cases the run
trained on are marked: their Dice says how settings agree, not how good the model is. Run it
on an otherwise idle machine.

    python scripts/compare_inference.py --model RUN [--cases ID ...] [--overlaps 0.5 0.25]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from segmenter.inference.predictor import Predictor


def settings(overlaps: list[float], mirrorings: list[str]) -> list[tuple[float, str]]:
    """The grid, in order: every overlap with every mirroring."""
    return [(o, m) for o in overlaps for m in mirrorings]


def infer(
    predictor: Predictor, image: np.ndarray, overlap: float, mirroring: str
) -> tuple[float, np.ndarray]:
    """Seconds and foreground probabilities of one setting."""
    from segmenter.inference.sliding_window import foreground_probability, predict_logits

    cfg = dataclasses.replace(
        predictor.config.inference, overlap=overlap, tta=mirroring != "none",
        mirroring="all" if mirroring == "none" else mirroring,
    )  # fmt: skip
    start = time.perf_counter()
    logits = predict_logits(predictor.model, image, predictor.patch_size, cfg,
                            device=predictor.device, dtype=predictor.dtype)  # fmt: skip
    seconds = time.perf_counter() - start
    return seconds, foreground_probability(logits, predictor.plan.activation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="trained run folder")
    parser.add_argument("--cases", nargs="*", help="case ids (default: every training case)")
    parser.add_argument("--overlaps", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--mirroring", nargs="+", default=["all", "single", "none"])
    args = parser.parse_args(argv)

    import torch

    from segmenter.data.layout import load_dataset
    from segmenter.evaluation.metrics import dice
    from segmenter.inference.predictor import load_predictor
    from segmenter.preprocessing.case import preprocess_case

    torch.set_num_threads(2)
    pred = load_predictor(args.model, device="cpu")
    splits = json.loads((Path(args.model) / "splits.json").read_text())
    fold = pred.plan.fold
    trained_on = set(splits[fold]["train"]) if isinstance(fold, int) else set(
        c for split in splits for c in split["train"] + split["val"])  # fmt: skip
    dataset = load_dataset(pred.config.data.dataset)
    cases = [c for c in dataset.training if not args.cases or c.case_id in args.cases]
    grid = settings(args.overlaps, args.mirroring)
    seconds = {s: [] for s in grid}
    to_label = {s: [] for s in grid}
    to_first = {s: [] for s in grid}
    for case in cases:
        pre = preprocess_case(case, spec=pred.plan.preprocessing)
        ref = (pre.label > 0).astype(np.uint8)
        first = None
        for s in grid:
            sec, prob = infer(pred, pre.image, *s)
            mask = (prob >= pred.plan.threshold).astype(np.uint8)
            first = mask if first is None else first
            seconds[s].append(sec)
            to_label[s].append(dice(mask, ref))
            to_first[s].append(dice(mask, first))
        seen = " (trained on)" if case.case_id in trained_on else ""
        print(f"{case.case_id}{seen}: " + ", ".join(
            f"{o:g}/{m} {to_label[(o, m)][-1]:.3f}" for o, m in grid), flush=True)  # fmt: skip
    print(f"\n{len(cases)} case(s), run {args.model}, threshold {pred.plan.threshold:g}")
    print(f"{'overlap':>8} {'mirroring':>10} {'seconds':>9} {'Dice':>7} {'vs first':>9}")
    for o, m in grid:
        print(f"{o:>8g} {m:>10} {np.mean(seconds[(o, m)]):>9.1f} "
              f"{np.mean(to_label[(o, m)]):>7.4f} {np.mean(to_first[(o, m)]):>9.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
