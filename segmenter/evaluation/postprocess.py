"""Post-processing of probability maps into lesion masks (numpy only, no torch, no file I/O)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segmenter.evaluation.components import component_sizes, label_components


def binarize(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground mask of a probability map.

    Args:
        probabilities: ``(X, Y, Z)`` float foreground probabilities in [0, 1].
        threshold: voxels with probability >= threshold are foreground.

    Returns:
        ``(X, Y, Z)`` uint8 mask of 0/1.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return (probabilities >= threshold).astype(np.uint8)


def remove_small_lesions(
    mask: np.ndarray,
    spacing: Sequence[float],
    min_mm3: float,
    *,
    connectivity: int = 26,
) -> np.ndarray:
    """Drop connected components whose volume is below ``min_mm3``.

    Args:
        mask: ``(X, Y, Z)`` binary mask (any integer or bool dtype).
        spacing: voxel size in mm along the mask's axes.
        min_mm3: minimum lesion volume in mm3; 0 keeps everything.
        connectivity: 6, 18 or 26 (as the lesion metrics).

    Returns:
        A uint8 mask with the small components removed (a copy).
    """
    out = (np.asarray(mask) > 0).astype(np.uint8)
    if min_mm3 <= 0 or not out.any():
        return out
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    labels, n = label_components(out, connectivity)
    keep = np.concatenate(([False], component_sizes(labels, n) * voxel_mm3 >= min_mm3))
    return keep[labels].astype(np.uint8)


def probabilities_to_mask(
    probabilities: np.ndarray,
    spacing: Sequence[float],
    *,
    threshold: float = 0.5,
    min_lesion_mm3: float = 0.0,
) -> np.ndarray:
    """Threshold, then remove lesions smaller than ``min_lesion_mm3`` (uint8 0/1)."""
    return remove_small_lesions(binarize(probabilities, threshold), spacing, min_lesion_mm3)
