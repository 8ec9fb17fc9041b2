"""3D rotation matrices from Euler angles (numpy and scipy only, no torch).

One convention for the phantoms' oblique affines and lesion shapes (:mod:`segmenter.data.synthetic`)
and the training rotations (:mod:`segmenter.training.augmentation`): extrinsic X-Y-Z angles in
radians.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """Rotation about the fixed X, then Y, then Z axis: ``Rz @ Ry @ Rx``.

    Args:
        angles: ``(3,)`` float angles in radians about X, Y and Z.

    Returns:
        ``(3, 3)`` float64 orthonormal matrix with determinant 1.
    """
    return Rotation.from_euler("xyz", angles).as_matrix()
