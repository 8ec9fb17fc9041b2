"""Tests for segmenter.preprocessing.pipeline: many cases at once, in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segmenter.data import layout as data
from segmenter.preprocessing.pipeline import preprocess_dataset


def test_preprocess_dataset_keeps_order(phantoms: Path) -> None:
    cases = data.load_dataset(phantoms).training
    threaded = preprocess_dataset(cases, workers=2)
    serial = preprocess_dataset(cases, workers=1)
    assert [p.case_id for p in threaded] == [c.case_id for c in cases]
    for a, b in zip(threaded, serial, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
