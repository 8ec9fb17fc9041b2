"""Fixtures shared across the test folders: the tiny training config, the phantom dataset most
end-to-end tests read, and one tiny trained run.

The shared dataset and run are written once per session and only read afterwards: a test that
damages files copies them into its own ``tmp_path`` first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny import PHANTOMS, TINY_CONFIG, train_tiny_run, write_phantoms, write_tiny_config

__all__ = ["PHANTOMS", "TINY_CONFIG", "write_tiny_config"]


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Path]:
    """:func:`write_tiny_config`, for tests and fixtures that write their own variant."""
    return write_tiny_config


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared phantom dataset (:data:`PHANTOMS`); read it, never change it."""
    return write_phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture
def tiny_config_file(phantoms: Path, tmp_path: Path) -> Path:
    """The tiny config for the shared phantoms, in this test's ``tmp_path``."""
    return write_tiny_config(tmp_path / "tiny.yaml", phantoms)


@pytest.fixture(scope="session")
def trained_run(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained with the tiny config on the shared phantoms (1 epoch, 2 steps);
    read it, or copy it before changing anything."""
    return train_tiny_run(tmp_path_factory.mktemp("trained"), phantoms)
