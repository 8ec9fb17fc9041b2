"""Tests for segmenter.training.validation: the threshold tuned on the validation cases."""

from __future__ import annotations

import numpy as np

from segmenter.config import load_config
from segmenter.training.validation import tune_threshold


def test_threshold_tuning_picks_the_best_lesion_f1() -> None:
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[2:5, 2:5, 2:5] = 1  # found at any threshold below 0.8
    ref[10:12, 10:12, 10:12] = 1  # faint: only found below 0.3
    prob = np.zeros(ref.shape, np.float32)
    prob[2:5, 2:5, 2:5] = 0.8
    prob[10:12, 10:12, 10:12] = 0.3
    prob[14, 1, 14] = 0.2  # a false positive below 0.25
    cfg = load_config(None, [])
    threshold, rows = tune_threshold([prob], [ref], [(1.0, 1.0, 1.0)], cfg)
    assert threshold == 0.25 or threshold == 0.3  # both lesions, no false positive
    best = next(r for r in rows if r["threshold"] == threshold)
    assert best["f1"] == 1.0 and best["recall"] == 1.0
    assert next(r for r in rows if r["threshold"] == 0.5)["recall"] == 0.5
    assert next(r for r in rows if r["threshold"] == 0.1)["precision"] < 1.0


def test_threshold_tuning_does_not_reward_one_blob_over_every_lesion() -> None:
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:4, 2:4, 2:4] = ref[12:14, 12:14, 12:14] = 1
    prob = np.full(ref.shape, 0.2, np.float32)  # low everywhere: at 0.1 one blob covers all
    prob[2:4, 2:4, 2:4] = prob[12:14, 12:14, 12:14] = 0.9
    prob[12, 12, 12] = 0.6
    threshold, rows = tune_threshold([prob], [ref], [(1.0, 1.0, 1.0)], load_config(None, []))
    blob = next(r for r in rows if r["threshold"] == 0.1)
    assert blob["f1"] == 1.0 and blob["dice"] < 0.01  # lesion F1 alone would take the blob
    assert threshold > 0.2
