"""Fixtures shared across the test folders: the tiny training config, the phantom dataset most
end-to-end tests read, and one tiny trained run.

The shared dataset and run are written once per session and only read afterwards: a test that
damages files copies them into its own ``tmp_path`` first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml

#: The tiny training config every end-to-end test starts from (32^3 patches, a depth-3 U-Net
#: with 4 to 16 filters, one epoch of two steps, three folds, float32 on two threads).
TINY_CONFIG: dict[str, dict[str, object]] = {
    "data": {"patch_size": [32, 32, 32], "num_workers": 0},
    "model": {"depth": 3, "base_filters": 4, "max_filters": 16},
    "train": {
        "epochs": 1,
        "iterations_per_epoch": 2,
        "val_every": 1,
        "n_folds": 3,
        "precision": "fp32",
        "threads": 2,
    },  # fmt: skip
    "inference": {"sw_batch_size": 1},
}

#: Settings of the shared phantom dataset: six 32^3 training cases and two test cases.
PHANTOMS = {"n_cases": 6, "seed": 0, "size": 32, "n_test": 2}


def write_tiny_config(
    path: Path, dataset: Path, changes: Mapping[str, object] | None = None
) -> Path:
    """Write :data:`TINY_CONFIG` for ``dataset`` to ``path`` as YAML.

    Args:
        path: the YAML file to write.
        dataset: the dataset folder (``data.dataset``).
        changes: dotted keys set on top of the tiny config, e.g. ``{"inference.tta": False}``.
    """
    values = copy.deepcopy(TINY_CONFIG)
    values["data"]["dataset"] = str(dataset)
    for key, value in (changes or {}).items():
        section, name = key.split(".")
        values.setdefault(section, {})[name] = str(value) if isinstance(value, Path) else value
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Path]:
    """:func:`write_tiny_config`, for tests and fixtures that write their own variant."""
    return write_tiny_config


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared phantom dataset (:data:`PHANTOMS`); read it, never change it."""
    from segmenter.data.synthetic import PhantomSpec, write_dataset

    root = tmp_path_factory.mktemp("phantoms")
    spec = PhantomSpec(size=PHANTOMS["size"])
    return write_dataset(
        root, PHANTOMS["n_cases"], seed=PHANTOMS["seed"], spec=spec, n_test=PHANTOMS["n_test"]
    )


@pytest.fixture
def tiny_config_file(phantoms: Path, tmp_path: Path) -> Path:
    """The tiny config for the shared phantoms, in this test's ``tmp_path``."""
    return write_tiny_config(tmp_path / "tiny.yaml", phantoms)


@pytest.fixture(scope="session")
def trained_run(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained with the tiny config on the shared phantoms (1 epoch, 2 steps);
    read it, or copy it before changing anything."""
    from segmenter.config import load_config
    from segmenter.training.loop import fit

    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(write_tiny_config(root / "tiny.yaml", phantoms))
    fit(cfg, root / "run", progress=False)
    return root / "run"
