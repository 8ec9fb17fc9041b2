"""Hand-built binary masks for the component, lesion and metric tests (not a test module)."""

from __future__ import annotations

import numpy as np


def boxes(shape: tuple[int, int, int], *regions: tuple) -> np.ndarray:
    """``(X, Y, Z)`` bool mask with each region set: a tuple of slices or one voxel's index."""
    mask = np.zeros(shape, dtype=bool)
    for region in regions:
        mask[region] = True
    return mask


#: The same builder, named for masks of single voxels: ``voxels(shape, (1, 2, 3), ...)``.
voxels = boxes
