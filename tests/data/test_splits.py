"""Tests for segmenter.data.splits: folds stratified by lesion burden."""

from __future__ import annotations

import pytest

from segmenter.data.splits import make_splits
from segmenter.errors import InputError


def test_splits_are_stratified_by_lesion_burden() -> None:
    ids = [f"c{i}" for i in range(10)]
    burdens = [0.0, 0.0, 0.001, 0.002, 0.003, 0.004, 0.01, 0.02, 0.03, 0.0]
    splits = make_splits(ids, burdens, 3, seed=0)
    vals = [set(s["val"]) for s in splits]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == 10
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
    free = {"c0", "c1", "c9"}
    assert all(len(v & free) == 1 for v in vals)  # lesion-free cases spread over the folds
    assert make_splits(ids, burdens, 3, seed=0) == splits
    with pytest.raises(InputError, match="fewer than train.n_folds"):
        make_splits(ids[:2], burdens[:2], 3, seed=0)
