"""Tests for segmenter.data.splits: folds stratified by lesion burden."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segmenter.data.layout import Case
from segmenter.data.splits import label_burdens, make_splits, read_splits
from segmenter.errors import InputError
from segmenter.io import write_image


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


def test_label_burdens_are_the_stored_lesion_volumes_in_ml(tmp_path: Path) -> None:
    label = np.zeros((10, 10, 10), np.uint8)
    label[:5, :4, :2] = 1  # 40 voxels of 2 x 1 x 0.5 mm = 40 mm3
    path = write_image(tmp_path / "a.nii.gz", label, np.diag([2.0, 1.0, 0.5, 1.0]))
    cases = [Case("a", (path,), label=path), Case("b", (path,))]
    assert label_burdens(cases) == [pytest.approx(0.04), 0.0]


def test_saved_splits_must_cover_the_dataset(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]))
    assert read_splits(path, ["a", "b"])[1] == {"train": ["b"], "val": ["a"]}
    with pytest.raises(InputError, match="fold 0 does not cover the dataset's cases"):
        read_splits(path, ["a", "b", "c"])
    path.write_text("[{")
    with pytest.raises(InputError, match="not a readable splits file"):
        read_splits(path, ["a", "b"])
