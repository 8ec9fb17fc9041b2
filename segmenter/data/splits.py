"""Cross-validation splits and where a config's dataset lies.

``splits.json`` in a run folder has nnU-Net's ``splits_final.json`` shape: one
``{"train": [...], "val": [...]}`` entry per fold. Cross-validation folders hold one run per
fold, ``fold_K`` (:func:`fold_dir`, :func:`fold_runs`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segmenter import io
from segmenter.config import Config
from segmenter.data.layout import Case
from segmenter.errors import InputError

FOLD_PREFIX = "fold_"


def resolve_dataset(cfg: Config, cwd: Path | None = None) -> Path:
    """The dataset folder of ``cfg`` (a relative path is taken from the working directory).

    Raises:
        InputError: ``data.dataset`` is not set.
    """
    if not cfg.data.dataset:
        raise InputError("data.dataset is not set (give it in the config or with --set)")
    path = Path(cfg.data.dataset).expanduser()
    return path if path.is_absolute() else (cwd or Path.cwd()) / path


def make_splits(
    case_ids: Sequence[str], burdens: Sequence[float], n_folds: int, seed: int
) -> list[dict[str, list[str]]]:
    """K-fold split stratified by lesion burden (nnU-Net's ``splits_final.json`` shape).

    Cases are sorted by burden (lesion-free first, ties shuffled with ``seed``) and dealt to the
    folds in turn, so every fold gets lesion-free, light and heavy cases alike.

    Raises:
        InputError: fewer cases than folds.
    """
    if len(case_ids) < n_folds:
        raise InputError(
            f"the dataset has {len(case_ids)} training cases, fewer than train.n_folds="
            f"{n_folds}; lower train.n_folds"
        )
    rng = np.random.default_rng(seed)
    jitter = rng.random(len(case_ids))
    order = sorted(range(len(case_ids)), key=lambda i: (burdens[i], jitter[i]))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    start = int(rng.integers(n_folds))
    for rank, i in enumerate(order):
        folds[(start + rank) % n_folds].append(case_ids[i])
    return [
        {
            "train": sorted(c for j, f in enumerate(folds) if j != k for c in f),
            "val": sorted(folds[k]),
        }
        for k in range(n_folds)
    ]


def label_burdens(cases: Sequence[Case]) -> list[float]:
    """Each case's lesion volume in ml (0 without a label), read from its label file as stored.

    The split is stratified by it rather than by the preprocessed labels, which change with
    the target spacing and the crop: two settings compared on "fold 0" hold out the same cases.
    """
    out = []
    for case in cases:
        if case.label is None:
            out.append(0.0)
            continue
        label = io.read_image(case.label)
        voxels = int(np.count_nonzero(label.array))
        out.append(voxels * float(np.prod(label.spacing)) / 1000.0)
    return out


def read_splits(path: Path, case_ids: Sequence[str]) -> list[dict[str, list[str]]]:
    """The folds a run saved in ``splits.json``, checked against the dataset's ``case_ids``.

    Raises:
        InputError: an unreadable file, or folds that name other cases than the dataset holds.
    """
    try:
        splits = json.loads(path.read_text())
        folds = [{"train": list(f["train"]), "val": list(f["val"])} for f in splits]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: not a readable splits file ({exc})") from None
    known = set(case_ids)
    for k, f in enumerate(folds):
        named = set(f["train"]) | set(f["val"])
        if named != known:
            extra, missing = sorted(named - known), sorted(known - named)
            raise InputError(
                f"{path}: fold {k} does not cover the dataset's cases "
                f"(unknown: {extra[:3]}, missing: {missing[:3]}); train into a new --out"
            )
    return folds


def fold_dir(folder: str | Path, fold: int | str) -> Path:
    """``FOLDER/fold_K``: where a cross-validation folder keeps fold K's run."""
    return Path(folder) / f"{FOLD_PREFIX}{fold}"


def fold_runs(folder: str | Path) -> list[Path]:
    """The ``fold_K`` runs (with a ``checkpoints`` folder) of a cross-validation folder, in
    fold order; empty when there are none."""
    runs = [
        d for d in Path(folder).glob(f"{FOLD_PREFIX}*")
        if d.name[len(FOLD_PREFIX):].isdigit() and (d / "checkpoints").is_dir()
    ]  # fmt: skip
    return sorted(runs, key=lambda d: int(d.name[len(FOLD_PREFIX) :]))


__all__ = [
    "FOLD_PREFIX", "fold_dir", "fold_runs", "label_burdens", "make_splits", "read_splits",
    "resolve_dataset",
]  # fmt: skip
