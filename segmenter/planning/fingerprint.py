"""Dataset fingerprint: what every case looks like before preprocessing (nnU-Net's fingerprint).

Per case: array shape, the shape once cropped to the nonzero region, voxel spacing (mm),
orientation (nibabel axis codes of the affine, e.g. ``RAS``), the fraction of voxels inside the
nonzero mask, per channel the mean, standard deviation, extremes and percentiles of the
intensities inside that mask (the voxels normalisation sees), and the lesions of the label
(connected components of ``label > 0``): their count and volumes in mm3. Over the dataset:
the median shape and spacing, the spacing range, per-channel percentiles pooled over the cases
(the median of each case's value), and the pooled lesion volumes. ``fingerprint.json`` holds
both (``write_fingerprint``).

Cases are read on a thread pool (decompression releases the GIL) with a progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from segmenter import io
from segmenter.atomic import write_text
from segmenter.data.layout import Case, Dataset
from segmenter.evaluation.components import lesion_volumes_mm3
from segmenter.evaluation.report import summary_json
from segmenter.preprocessing.case import read_case
from segmenter.preprocessing.geometry import nonzero_bbox
from segmenter.preprocessing.normalisation import nonzero_mask

#: Intensity percentiles recorded per channel (nnU-Net's CT clipping uses 0.5 and 99.5).
PERCENTILES = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)
#: Connectivity of the lesion components (26: voxels touching at a corner belong together).
CONNECTIVITY = 26


def _channel_stats(values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        nan = math.nan
        return {"mean": nan, "std": nan, "min": nan, "max": nan,
                "percentiles": {str(p): nan for p in PERCENTILES}}  # fmt: skip
    v = values.astype(np.float64, copy=False)
    pct = np.percentile(v, PERCENTILES)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentiles": {str(p): float(x) for p, x in zip(PERCENTILES, pct, strict=True)},
    }


def case_fingerprint(case: Case) -> dict[str, Any]:
    """The fingerprint of one case (see the module docstring).

    Raises:
        InputError: an unreadable or inconsistent file (from :func:`read_case`).
    """
    images, label = read_case(case, with_label=case.label is not None)
    first = images[0]
    stack = np.stack([im.array for im in images])
    mask = nonzero_mask(stack)
    box = nonzero_bbox(stack)
    volumes = [] if label is None else lesion_volumes_mm3(label, first.spacing)
    return {
        "case_id": case.case_id,
        "shape": [int(n) for n in first.array.shape],
        "cropped_shape": [int(n) for n in box.size],
        "spacing": [float(s) for s in first.spacing],
        "orientation": io.axis_codes(first.affine),
        "nonzero_fraction": float(mask.mean()),
        "channels": [_channel_stats(ch[mask]) for ch in stack],
        "lesion_count": len(volumes),
        "lesion_volumes_mm3": volumes,
        "lesion_total_mm3": float(sum(volumes)),
    }


def _median(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.median(vals)) if vals else math.nan


def summarise(cases: Sequence[dict[str, Any]], channel_names: Sequence[str]) -> dict[str, Any]:
    """Dataset-level figures from the per-case fingerprints."""
    shapes = np.array([c["shape"] for c in cases], dtype=float)
    spacings = np.array([c["spacing"] for c in cases], dtype=float)
    channels = []
    for i, name in enumerate(channel_names):
        stats = [c["channels"][i] for c in cases]
        channels.append({
            "name": str(name),
            "median_mean": _median(s["mean"] for s in stats),
            "median_std": _median(s["std"] for s in stats),
            "min": min((s["min"] for s in stats), default=math.nan),
            "max": max((s["max"] for s in stats), default=math.nan),
            "median_percentiles": {
                str(p): _median(s["percentiles"][str(p)] for s in stats) for p in PERCENTILES
            },
        })  # fmt: skip
    volumes = [v for c in cases for v in c["lesion_volumes_mm3"]]
    counts = [c["lesion_count"] for c in cases]
    return {
        "n_cases": len(cases),
        "median_shape": [float(x) for x in np.median(shapes, axis=0)] if len(cases) else [],
        "median_spacing": [float(x) for x in np.median(spacings, axis=0)] if len(cases) else [],
        "min_spacing": [float(x) for x in spacings.min(axis=0)] if len(cases) else [],
        "max_spacing": [float(x) for x in spacings.max(axis=0)] if len(cases) else [],
        "orientations": sorted({c["orientation"] for c in cases}),
        "channels": channels,
        "lesions": {
            "total": int(sum(counts)),
            "cases_without_lesions": int(sum(1 for n in counts if n == 0)),
            "per_case_median": _median(float(n) for n in counts),
            "volume_mm3_percentiles": {
                str(p): float(np.percentile(volumes, p)) for p in (5, 25, 50, 75, 95)
            }
            if volumes
            else {},
        },  # fmt: skip
    }


def dataset_fingerprint(
    dataset: Dataset,
    *,
    workers: int = 2,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Fingerprint of every training case of ``dataset`` and the dataset summary.

    Args:
        dataset: a loaded dataset (``segmenter.data.layout.load_dataset``).
        workers: cases read concurrently (threads).
        progress: optional wrapper ``progress(iterable, total)`` (e.g. a tqdm factory).

    Returns:
        ``{"dataset", "channel_names", "file_ending", "summary", "cases": [...]}``, cases in
        the dataset's order.
    """
    cases = list(dataset.training)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results: Iterable[dict[str, Any]] = pool.map(case_fingerprint, cases)
        if progress is not None:
            results = progress(results, len(cases))
        per_case = list(results)
    names = [dataset.channel_names[i] for i in sorted(dataset.channel_names)]
    return {
        "dataset": str(dataset.root),
        "channel_names": names,
        "file_ending": dataset.file_ending,
        "summary": summarise(per_case, names),
        "cases": per_case,
    }


def write_fingerprint(fingerprint: dict[str, Any], path: str | Path) -> Path:
    """Write ``fingerprint.json`` atomically (strict JSON, NaN as null); returns the path."""
    out = Path(path)
    write_text(out, summary_json(fingerprint) + "\n")
    return out
