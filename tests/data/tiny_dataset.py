"""Builders of tiny nnU-Net raw datasets for the data and verify tests (not a test module).

``make_dataset`` writes two-channel float32 cases and uint8 labels of shape :data:`SHAPE` on
one grid; ``edit_json`` and ``rewrite`` break them in one place; ``messages`` gives report
lines that do not depend on the temporary folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segmenter.data.layout import Problem
from segmenter.io import read_image, write_image

SHAPE = (8, 9, 10)
CHANNELS = {"0": "FLAIR", "1": "T1"}


def grid(
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.2),
    origin: tuple[float, float, float] = (10.0, -20.0, 5.0),
) -> np.ndarray:
    """Axis-aligned affine with a flipped first axis (as most scanners write)."""
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def lesion_mask(lesion: bool = True) -> np.ndarray:
    """A ``SHAPE`` uint8 label with one 8-voxel lesion, or none."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    if lesion:
        mask[2:4, 3:5, 4:6] = 1
    return mask


def make_dataset(
    root: Path,
    *,
    cases: tuple[str, ...] = ("case_a", "case_b"),
    lesion_free: tuple[str, ...] = (),
    test_cases: tuple[str, ...] = (),
    test_labels: tuple[str, ...] = (),
    channels: dict[str, str] = CHANNELS,
    meta: dict | None = None,
    ending: str = ".nii.gz",
) -> Path:
    """A tiny nnU-Net raw dataset: float32 channels and uint8 labels on one grid."""
    rng = np.random.default_rng(0)
    affine = grid()
    for sub, names in (("imagesTr", cases), ("imagesTs", test_cases)):
        for case in names:
            for c in range(len(channels)):
                image = rng.normal(size=SHAPE).astype(np.float32)
                write_image(root / sub / f"{case}_{c:04d}{ending}", image, affine)
    for case in cases:
        mask = lesion_mask(case not in lesion_free)
        write_image(root / "labelsTr" / f"{case}{ending}", mask, affine)
    for case in test_labels:
        write_image(root / "labelsTs" / f"{case}{ending}", lesion_mask(), affine)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    dataset_json = {
        "channel_names": channels,
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(cases),
        "file_ending": ending,
        "name": "Tiny",
    }
    dataset_json.update(meta or {})
    (root / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    return root


def edit_json(root: Path, **changes: object) -> None:
    """Set keys of ``dataset.json``; a value of None removes the key."""
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def rewrite(path: Path, change: Callable[[np.ndarray, np.ndarray], tuple]) -> None:
    """Rewrite an image file with ``(array, affine) = change(array, affine)``."""
    img = read_image(path, ndim=None)
    array, affine = change(img.array, img.affine.copy())
    write_image(path, array, affine)


def messages(problems: list[Problem], root: Path) -> list[str]:
    """Report lines with the dataset root replaced by ``~`` (stable across tmp paths)."""
    return [str(p).replace(str(root), "~") for p in problems]
