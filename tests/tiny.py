"""The tiny training config, phantom dataset and trained run the end-to-end tests share, as plain
functions (no pytest), so scripts can build the same world: ``tests/conftest.py`` wraps them in
session fixtures, ``tests/bad_input_cases.py`` calls them outside pytest."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

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


def write_phantoms(root: Path) -> Path:
    """The phantom dataset of :data:`PHANTOMS` under ``root``; returns its folder."""
    from segmenter.data.synthetic import PhantomSpec, write_dataset

    spec = PhantomSpec(size=PHANTOMS["size"])
    return write_dataset(
        root, PHANTOMS["n_cases"], seed=PHANTOMS["seed"], spec=spec, n_test=PHANTOMS["n_test"]
    )


def train_tiny_run(root: Path, dataset: Path) -> Path:
    """Train the tiny config on ``dataset`` into ``root/run`` (1 epoch, 2 steps); returns it."""
    from segmenter.config import load_config
    from segmenter.training.loop import fit

    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_tiny_config(root / "tiny.yaml", dataset))
    fit(cfg, root / "run", progress=False)
    return root / "run"


def load_script(name: str) -> ModuleType:
    """``scripts/NAME.py`` as a module, registered in ``sys.modules`` (its dataclasses look
    their module up there)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
