"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_dataset import make_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A fresh two-case tiny dataset (``case_a``, ``case_b``) that a test may break."""
    return make_dataset(tmp_path / "Dataset900_Tiny", cases=("case_a", "case_b"))
