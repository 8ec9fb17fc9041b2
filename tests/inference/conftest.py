"""Fixtures of the inference tests: the shared tiny run loaded for prediction."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmenter.inference.predictor import Predictor, load_predictor


@pytest.fixture(scope="session")
def predictor(trained_run: Path) -> Predictor:
    """The shared tiny run (see ``tests/conftest.py``) on the CPU."""
    return load_predictor(trained_run, device="cpu")
