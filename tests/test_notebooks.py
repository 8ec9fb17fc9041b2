"""The notebooks run clean with a tiny budget (nbclient, parameters injected as papermill does).

Each notebook's cell tagged ``parameters`` keeps its defaults; a cell tagged
``injected-parameters`` right after it (replacing any committed one) sets small values, and
the whole notebook runs in a fresh kernel from the ``notebooks`` folder. Any cell error fails
the test with the cell's traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str, params: dict[str, Any], timeout: int = 300) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    at = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters (injected by tests/test_notebooks.py)\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items()
    )
    injected = nbformat.v4.new_code_cell(source)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = cells[: at + 1] + [injected] + cells[at + 1 :]
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )


def test_compare_losses_notebook_runs(tmp_path: Path) -> None:
    nb = _run(
        "compare_losses.ipynb",
        {
            "DATASET": None,
            "CONFIG": None,
            "OVERRIDES": [
                "data.patch_size=[32, 32, 32]", "model.depth=3", "model.base_filters=4",
                "train.epochs=1", "train.iterations_per_epoch=2", "train.val_every=1",
                "train.n_folds=3", "inference.tta=false", "inference.sw_batch_size=1",
            ],
            "ONLY": ["dice", "focal_dice_1_1"],
            "MINUTES": None,
            "FOLDS": [0, 1],
            "OUT": str(tmp_path / "cmp"),
            "PHANTOMS": {"train": 6, "test": 2, "size": 32, "seed": 0},
        },
    )  # fmt: skip
    text = _text(nb)
    assert "2 variants, each 1 epochs x 2 steps: dice, focal_dice_1_1" in text
    assert "highest lesion F1:" in text and "adding focal to Dice" in text
    assert "mean of 2" in text and "vs reference (per case)" in text  # two folds, paired
    assert "focal_dice_1_1 vs dice, lesion_f1 per case:" in text
    assert (tmp_path / "cmp" / "comparison.csv").is_file()
    assert _images(nb) >= 5  # focal curves + the comparison plots


def test_explore_dataset_notebook_runs(tmp_path: Path) -> None:
    nb = _run(
        "explore_dataset.ipynb",
        {
            "DATASET": None,
            "OUT": str(tmp_path / "explore"),
            "MAX_CASES_SHOWN": 2,
            "PHANTOMS": {"train": 3, "size": 32, "seed": 1},
        },
    )
    text = _text(nb)
    assert "no problems found" in text and "lesions:" in text
    assert (tmp_path / "explore" / "fingerprint.json").is_file()
    assert _images(nb) >= 2  # slices + histogram


@pytest.mark.parametrize("name", ["compare_losses.ipynb", "explore_dataset.ipynb"])
def test_notebooks_have_a_parameters_cell(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert sum("parameters" in t for t in tags) == 1
