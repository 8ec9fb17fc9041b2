"""Tests for segmenter.preprocessing.pipeline: many cases at once, in order."""

from __future__ import annotations

import numpy as np
import pytest

from segmenter.data import layout as data
from segmenter.data.synthetic import PhantomSpec, write_dataset
from segmenter.preprocessing.pipeline import preprocess_dataset


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> data.Dataset:
    root = write_dataset(tmp_path_factory.mktemp("ds"), 3, seed=0, spec=PhantomSpec(size=32))
    return data.load_dataset(root)


def test_preprocess_dataset_keeps_order(phantom_dataset: data.Dataset) -> None:
    cases = phantom_dataset.training
    threaded = preprocess_dataset(cases, workers=2)
    serial = preprocess_dataset(cases, workers=1)
    assert [p.case_id for p in threaded] == [c.case_id for c in cases]
    for a, b in zip(threaded, serial, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
