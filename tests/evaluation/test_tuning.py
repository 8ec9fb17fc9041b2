"""Tests for segmenter.evaluation.tuning: the size grid and the grid search on cropped cases."""

from __future__ import annotations

import numpy as np
import pytest

from segmenter.evaluation import metrics, tuning
from segmenter.evaluation.postprocess import probabilities_to_mask


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    d2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
    return d2 <= radius**2


def test_small_lesions_keep_the_fixed_size_grid() -> None:
    ref = (_ball((20, 20, 20), (5, 5, 5), 1.5) | _ball((20, 20, 20), (14, 14, 14), 2)).astype(
        np.uint8
    )
    rule = metrics.PRESETS["isles22"]
    assert tuning.min_size_grid([ref], [(1.0, 1.0, 1.0)], rule) == tuning.MIN_SIZES_MM3
    empty = np.zeros_like(ref)
    assert tuning.min_size_grid([empty], [(1.0, 1.0, 1.0)], rule) == tuning.MIN_SIZES_MM3


def test_large_lesions_extend_the_size_grid_to_a_tenth_of_their_median_volume() -> None:
    ref = _ball((40, 40, 40), (20, 20, 20), 12).astype(np.uint8)  # about 7240 voxels
    for corner in range(0, 8, 2):
        ref[corner, 0, 0] = 1  # specks of 2 mm3, as whole-tumour labels have beside the tumour
    rule = metrics.PRESETS["brats23"]  # counts lesions over 50 mm3 only
    grid = tuning.min_size_grid([ref], [(1.0, 1.0, 2.0)], rule)  # about 14500 mm3
    assert grid == (*tuning.MIN_SIZES_MM3, 100.0, 200.0, 500.0, 1000.0)
    specks_count = metrics.PRESETS["isles22"]  # every component counts: the median is a speck
    assert tuning.min_size_grid([ref], [(1.0, 1.0, 2.0)], specks_count) == tuning.MIN_SIZES_MM3


def test_grid_search_scores_as_on_the_whole_volume() -> None:
    rng = np.random.default_rng(4)
    shape = (48, 40, 36)
    ref = (_ball(shape, (12, 12, 12), 4) | _ball(shape, (40, 32, 28), 3)).astype(np.uint8)
    prob = np.zeros(shape, dtype=np.float32)
    prob[_ball(shape, (13, 12, 12), 4)] = 0.8  # the second lesion is missed, far from the crop
    speckled = prob[::-1].copy()
    speckled[_ball(shape, (35, 30, 25), 2)] = 0.6  # a false positive
    speckled[rng.random(shape) < 0.001] = 0.3
    refs, probs, spacings = [ref, np.zeros_like(ref)], [prob, speckled], [(1.0,) * 3] * 2
    rule = metrics.PRESETS["brats23"]  # dilated matching: the crop keeps a margin for it
    best, rows = tuning.grid_search(
        probs, refs, spacings, rule, thresholds=(0.2, 0.5, 0.7), min_sizes_mm3=(0.0, 50.0)
    )
    assert len(rows) == 6
    for row in rows:
        masks = [
            probabilities_to_mask(
                p, s, threshold=row["threshold"], min_lesion_mm3=row["min_lesion_mm3"]
            )
            for p, s in zip(probs, spacings, strict=True)
        ]
        whole = tuning.score(masks, refs, spacings, rule)
        for key, value in whole.items():
            assert row[key] == pytest.approx(value, nan_ok=True), key
    assert best["criterion"] == max(r["criterion"] for r in rows)


def test_a_blob_merging_every_lesion_does_not_win_the_tuning() -> None:
    # Ten lesions; the model finds two at 0.6 and marks a whole 'brain' at 0.15. At 0.1 one
    # blob overlaps all ten (ISLES'22 F1 1.0, Dice near 0): the arithmetic mean of F1 and Dice
    # (0.5+) preferred that useless mask to 0.5's two clean lesions (F1 and Dice 0.33).
    shape = (40, 40, 40)
    centres = [(6 + 7 * (i % 5), 10 + 20 * (i // 5), 20) for i in range(10)]
    ref = np.zeros(shape, np.uint8)
    for c in centres:
        ref[_ball(shape, c, 2)] = 1
    prob = np.full(shape, 0.15, np.float32)
    for c in centres[:2]:
        prob[_ball(shape, c, 2)] = 0.6
    rule = metrics.PRESETS["isles22"]
    best, rows = tuning.grid_search([prob], [ref], [(1.0,) * 3], rule, thresholds=(0.1, 0.5))
    blob = next(r for r in rows if r["threshold"] == 0.1)
    assert blob["f1"] == 1.0 and blob["dice"] < 0.1
    assert best["threshold"] == 0.5 and best["dice"] > 0.3
