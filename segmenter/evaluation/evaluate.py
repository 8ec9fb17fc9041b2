"""``segmenter evaluate``: pair predicted and reference label files and report metrics.

Pairs files by case id, checks them (readable, integer labels, same shape and geometry) and
hands the arrays to :mod:`segmenter.evaluation.report`, which measures, aggregates and writes
``summary.json`` and ``lesions.csv``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.errors import InputError
from segmenter.evaluation import metrics
from segmenter.evaluation.report import CasePair, CaseResult, measure_case, summarise, write_report
from segmenter.io import Image, affines_close, is_image_file, read_image, strip_suffix


def _image_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.exists():
        raise InputError(f"{folder}: {role} folder not found")
    if not folder.is_dir():
        raise InputError(f"{folder}: {role} path is not a folder")
    files = {
        strip_suffix(p): p for p in sorted(folder.iterdir()) if p.is_file() and is_image_file(p)
    }
    if not files:
        raise InputError(f"{folder}: no image files (.nii.gz, .nii, .nrrd, .mha, .mhd) found")
    return files


def pair_cases(pred_dir: str | Path, ref_dir: str | Path) -> list[CasePair]:
    """Pair prediction and reference files by case id (the file name without extension).

    Raises:
        InputError: a folder is missing or empty, or a reference has no prediction, or a
            prediction has no reference.
    """
    preds = _image_files(Path(pred_dir), "prediction")
    refs = _image_files(Path(ref_dir), "reference")
    missing = sorted(set(refs) - set(preds))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{refs[missing[0]]}: no prediction for case '{missing[0]}'{more}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise InputError(f"{preds[extra[0]]}: no reference for case '{extra[0]}'{more}")
    return [CasePair(c, preds[c], refs[c]) for c in sorted(refs)]


def _read_labels(path: Path) -> Image:
    img = read_image(path)
    arr = img.array
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{path}: NaN or inf voxels in a label map")
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(f"{path}: non-integer label values (is this a probability map?)")
    elif arr.dtype.kind not in "iub":
        raise InputError(f"{path}: unsupported label voxel type {arr.dtype}")
    if arr.dtype.kind in "if" and arr.min(initial=0) < 0:
        raise InputError(f"{path}: negative label values")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.int32)
    return Image(arr, img.affine, img.spacing, img.header, img.path)


def evaluate_case(
    pair: CasePair,
    rule: metrics.LesionRule,
    size_bins_mm3: Sequence[float],
    labels: Sequence[int] | None = None,
) -> CaseResult:
    """Measure one case.

    Args:
        pair: the files.
        rule: lesion matching rule (a preset from ``metrics.PRESETS``).
        size_bins_mm3: edges of the lesion-size bins.
        labels: label values to report voxel metrics for; None = every value > 0 in either map.

    Raises:
        InputError: unreadable file, non-integer labels, shape or geometry mismatch.
    """
    ref = _read_labels(pair.reference)
    pred = _read_labels(pair.prediction)
    if pred.array.shape != ref.array.shape:
        raise InputError(
            f"{pair.prediction}: shape {pred.array.shape} does not match reference "
            f"{pair.reference.name} {ref.array.shape}"
        )
    if not affines_close(pred.affine, ref.affine, atol_mm=1e-2, rtol=1e-3):
        raise InputError(
            f"{pair.prediction}: geometry (affine) does not match reference {pair.reference.name}"
        )
    return measure_case(
        pair, pred.array, ref.array, ref.spacing, ref.affine, rule, size_bins_mm3, labels
    )


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    *,
    preset: str = "isles22",
    size_bins_mm3: Sequence[float] = metrics.DEFAULT_SIZE_BINS_MM3,
    out_dir: str | Path | None = None,
    workers: int = 2,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate every case of ``pred_dir`` against ``ref_dir``; write outputs to ``out_dir``.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps (same case ids).
        preset: lesion matching preset (see ``metrics.PRESETS``).
        size_bins_mm3: lesion-size bin edges in mm3.
        out_dir: where ``summary.json`` and ``lesions.csv`` go (default: ``pred_dir``).
        workers: cases evaluated concurrently (threads; file decompression releases the GIL).
        progress: optional wrapper ``progress(iterable, total)`` (e.g. a tqdm factory).

    Returns:
        The summary dict (NaN kept as float NaN; the JSON file stores null).

    Raises:
        InputError: unknown preset, missing/unreadable/mismatched files.
    """
    if preset not in metrics.PRESETS:
        raise InputError(f"unknown preset '{preset}'; valid presets: {', '.join(metrics.PRESETS)}")
    rule = metrics.PRESETS[preset]
    pairs = pair_cases(pred_dir, ref_dir)
    bins = tuple(float(b) for b in size_bins_mm3)

    def run(pair: CasePair) -> CaseResult:
        return evaluate_case(pair, rule, bins)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        iterator: Iterable[CaseResult] = pool.map(run, pairs)
        if progress is not None:
            iterator = progress(iterator, len(pairs))
        results = list(iterator)
    summary = summarise(results, preset, rule)
    write_report(results, summary, out_dir if out_dir is not None else pred_dir)
    return summary
