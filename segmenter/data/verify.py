"""Dataset verification (``segmenter verify``): every problem of a dataset, one line each.

:func:`verify_dataset` lists the layout problems :mod:`segmenter.data.layout` finds (it stops at the
first one; this reports them all) and then opens each file: header geometry first, then the
voxels. Every message starts with a fixed phrase, so a report can be grepped; besides the
layout phrases of :mod:`segmenter.data.layout`: ``unreadable``, ``bad header`` (a header field
:mod:`segmenter.io` refuses: voxel sizes, transforms, qform/sform, scaling, voxel type),
``4D image`` (or ``2D image``...),
``shape mismatch``, ``spacing mismatch``, ``affine mismatch``, ``NaN voxels``, ``inf voxels``,
``non-integer label values``, ``undeclared label values``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segmenter import io
from segmenter.data.layout import Problem, _Entry, _read_meta, _resolve_root, _scan_dataset
from segmenter.errors import InputError

logger = logging.getLogger(__name__)

#: Relative tolerance on voxel spacing between a case's channels and its label (nnU-Net-like).
SPACING_RTOL = 1e-4
#: Absolute tolerance on the affine origin (world position of voxel 0), in mm, per axis.
ORIGIN_ATOL_MM = 1e-3
#: Absolute tolerance on the direction cosines (unit columns of the affine's 3x3 part).
DIRECTION_ATOL = 1e-4

_MAX_LISTED_VALUES = 5


def _own_message(exc: InputError, path: Path) -> str:
    """The io error's message without its leading ``<path>: ``."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _unreadable(exc: InputError, path: Path) -> Problem:
    """The problem line of a file :mod:`segmenter.io` refused."""
    phrase = "bad header" if isinstance(exc, io.HeaderError) else "unreadable"
    return Problem(path, f"{phrase}: {_own_message(exc, path)}")


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape with trailing singleton axes beyond the third dropped (as io.read_image does)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _directions(affine: np.ndarray) -> np.ndarray:
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    return m / np.where(norms > 0, norms, 1.0)


def _compare_geometry(info: io.ImageInfo, ref: io.ImageInfo) -> list[str]:
    """Mismatches of ``info`` against the case's reference file, one message each."""
    messages: list[str] = []
    ref_name = ref.path.name
    if info.shape[:3] != ref.shape[:3]:
        messages.append(
            f"shape mismatch: {io.describe(info.shape[:3])}, "
            f"expected {io.describe(ref.shape[:3])} as in {ref_name}"
        )
    if not np.allclose(info.spacing, ref.spacing, rtol=SPACING_RTOL, atol=0.0):
        messages.append(
            f"spacing mismatch: {io.describe(info.spacing)} mm, expected "
            f"{io.describe(ref.spacing)} mm as in {ref_name} (relative tolerance {SPACING_RTOL:g})"
        )
    direction_diff = float(np.abs(_directions(info.affine) - _directions(ref.affine)).max())
    if direction_diff > DIRECTION_ATOL:
        messages.append(
            f"affine mismatch: orientation differs from {ref_name} "
            f"(direction cosines differ by up to {direction_diff:.3g})"
        )
    origin = np.asarray(info.affine, dtype=np.float64)[:3, 3]
    ref_origin = np.asarray(ref.affine, dtype=np.float64)[:3, 3]
    origin_diff = float(np.abs(origin - ref_origin).max())
    if origin_diff > ORIGIN_ATOL_MM:
        messages.append(
            f"affine mismatch: origin off by {origin_diff:.4g} mm from {ref_name} "
            f"(tolerance {ORIGIN_ATOL_MM:g} mm)"
        )
    return messages


def _non_finite(array: np.ndarray) -> tuple[int, int]:
    """Numbers of NaN and of infinite voxels (0, 0 for integer arrays)."""
    if array.dtype.kind not in "fc" or np.isfinite(array).all():
        return 0, 0
    n_nan = int(np.isnan(array).sum())
    return n_nan, int(np.isinf(array).sum())


def _values_outside(array: np.ndarray, declared: frozenset[int]) -> list[int]:
    """Integer values present in ``array`` that are not in ``declared``, ascending."""
    if array.size == 0:
        return []
    lo, hi = int(array.min()), int(array.max())
    candidates = [v for v in range(lo, hi + 1) if v not in declared] if hi - lo <= 1024 else None
    if candidates is None:
        return sorted(int(v) for v in np.unique(array) if int(v) not in declared)
    # Usually empty (all of lo..hi declared): then min/max were all it took.
    return [v for v in candidates if bool((array == v).any())]


def _label_value_problems(array: np.ndarray, declared: frozenset[int]) -> list[str]:
    messages: list[str] = []
    values = array
    if array.dtype.kind == "b":
        values = array.view(np.uint8)
    elif array.dtype.kind == "c":
        return [f"non-integer label values: complex voxel type {array.dtype}"]
    elif array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            values = array[finite]
        rounded = np.rint(values)
        fractional = values != rounded
        if fractional.any():
            distinct = np.unique(values[fractional])
            shown = ", ".join(f"{v:g}" for v in distinct[:_MAX_LISTED_VALUES])
            more = ", ..." if distinct.size > _MAX_LISTED_VALUES else ""
            messages.append(
                f"non-integer label values {shown}{more} "
                f"({int(fractional.sum())} of {array.size} voxels)"
            )
            rounded = rounded[~fractional]
        values = rounded
    outside = _values_outside(values, declared)
    if outside:
        shown = ", ".join(str(v) for v in outside[:_MAX_LISTED_VALUES])
        more = ", ..." if len(outside) > _MAX_LISTED_VALUES else ""
        allowed = ", ".join(str(v) for v in sorted(declared))
        messages.append(f"undeclared label values {shown}{more} (dataset.json labels: {allowed})")
    return messages


def _check_entry(entry: _Entry, declared: frozenset[int] | None) -> list[Problem]:
    """All file-level problems of one case: readability, dimensionality, geometry, voxels."""
    problems: list[Problem] = []
    files = list(entry.images.values()) + ([entry.label] if entry.label is not None else [])
    infos: list[io.ImageInfo] = []
    for path in files:
        try:
            info = io.read_info(path)
        except InputError as exc:
            problems.append(_unreadable(exc, path))
            continue
        spatial = _spatial_shape(info.shape)
        if len(spatial) != 3:
            problems.append(
                Problem(
                    path,
                    f"{len(spatial)}D image: shape {io.describe(info.shape)}, expected 3D",
                )
            )
            continue
        infos.append(info)
    if infos:
        ref = infos[0]  # channel 0 unless it is missing or unreadable
        for info in infos[1:]:
            problems += [Problem(info.path, m) for m in _compare_geometry(info, ref)]
    for info in infos:
        path = info.path
        try:
            array = io.read_image(path, ndim=3).array
        except InputError as exc:
            problems.append(_unreadable(exc, path))
            continue
        n_nan, n_inf = _non_finite(array)
        if n_nan:
            problems.append(Problem(path, f"NaN voxels: {n_nan} of {array.size}"))
        if n_inf:
            problems.append(Problem(path, f"inf voxels: {n_inf} of {array.size}"))
        if path == entry.label and declared is not None:
            problems += [Problem(path, m) for m in _label_value_problems(array, declared)]
        del array
    return problems


def verify_dataset(root: str | Path, *, progress: bool = False, workers: int = 2) -> list[Problem]:
    """Check a dataset and list every problem found (an empty list: the dataset is clean).

    Checks, in this order: ``dataset.json`` (present, valid JSON, required keys and their
    values), the folders (``imagesTr``/``labelsTr`` present, stray files, undeclared channels,
    ``numTraining``), each case's layout (missing channel, missing label, label without images),
    then each file of each case: readable header, 3D, shape/spacing/affine equal to the case's
    first channel within :data:`SPACING_RTOL`, :data:`ORIGIN_ATOL_MM` and
    :data:`DIRECTION_ATOL`, readable voxels, no NaN or inf voxels, and for labels only integer
    values declared in ``dataset.json``. An empty label (lesion-free case) is valid.

    Args:
        root: the dataset folder (or its ``dataset.json``).
        progress: show a tqdm progress bar over cases (on stderr).
        workers: cases checked in parallel (threads: zlib and numpy release the GIL).

    Returns:
        The problems, dataset-level first, then per case in case-id order (training, then
        test); ``str(problem)`` is the report line ``<file>: <problem>``.
    """
    try:
        path = _resolve_root(root)
    except InputError as exc:
        return [Problem(Path(root), _own_message(exc, Path(root)))]
    meta, problems = _read_meta(path)
    if meta.channel_names is None or meta.file_ending is None:
        return problems  # without channels and file ending the files cannot be matched
    layout = _scan_dataset(path, meta)
    problems += layout.problems + layout.strays
    entries = layout.train + layout.test
    declared = frozenset(meta.labels.values()) if meta.labels is not None else None

    results: list[list[Problem]] = [[] for _ in entries]
    with tqdm(total=len(entries), desc="verify", unit="case", disable=not progress) as bar:
        if workers <= 1 or len(entries) <= 1:
            for i, entry in enumerate(entries):
                results[i] = _check_entry(entry, declared)
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_check_entry, e, declared): i for i, e in enumerate(entries)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    for entry, found in zip(entries, results, strict=True):
        problems += entry.problems + found
    logger.debug("verified %s: %d cases, %d problems", path, len(entries), len(problems))
    return problems


__all__ = ["DIRECTION_ATOL", "ORIGIN_ATOL_MM", "SPACING_RTOL", "verify_dataset"]
