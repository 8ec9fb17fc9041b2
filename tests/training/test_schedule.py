"""Tests for segmenter.training.schedule: the learning-rate factor of each schedule."""

from __future__ import annotations

import pytest

from segmenter.config import load_config
from segmenter.training.schedule import lr_factor


def test_learning_rate_schedules() -> None:
    poly = load_config(None, [])
    assert lr_factor(poly.train, 0.0, 0, 0) == 1.0
    assert lr_factor(poly.train, 0.5, 50, 0) == pytest.approx(0.5**0.9)
    assert lr_factor(poly.train, 1.0, 100, 0) == 0.0
    cosine = load_config(None, ["train.scheduler=cosine"])
    assert lr_factor(cosine.train, 0.5, 50, 0) == pytest.approx(0.5)
    assert lr_factor(poly.train, 0.0, 4, 10) == pytest.approx(0.5)  # warm-up: step 5 of 10
