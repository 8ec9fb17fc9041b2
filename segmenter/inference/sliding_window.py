"""Sliding-window inference with mirroring test-time augmentation.

- :func:`sliding_window_logits`: logits of a whole preprocessed volume from overlapping
  windows combined with Gaussian weights (MONAI's ``sliding_window_inference``, nnU-Net's sigma
  of 1/8 of the window);
- :func:`predict_logits`: the same, averaged over the 8 mirrorings of the three axes
  (:data:`MIRROR_AXES`, nnU-Net's TTA) when TTA is on;
- :func:`foreground_probability`: the foreground probability map of the logits.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from segmenter.config import InferenceConfig
from segmenter.nn.runtime import autocast

MIRROR_AXES: tuple[tuple[int, ...], ...] = tuple(
    axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)
)


def sliding_window_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: tuple[int, int, int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits of a whole volume.

    Args:
        model: network in eval mode returning ``(B, K, x, y, z)`` logits.
        image: ``(1, C, X, Y, Z)`` float, preprocessed, on the model's device.
        patch_size: window size (the training patch).
        overlap: window overlap fraction (0.5 as nnU-Net).
        sw_batch_size: windows per forward pass.
        dtype: autocast dtype or None for float32.

    Returns:
        ``(1, K, X, Y, Z)`` float32 logits.
    """
    from monai.inferers import sliding_window_inference

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(image.device, dtype):
            return model(x).float()

    out = sliding_window_inference(
        image,
        roi_size=patch_size,
        sw_batch_size=sw_batch_size,
        predictor=forward,
        overlap=overlap,
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
    )
    return torch.as_tensor(out).float()


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    cfg: InferenceConfig,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tta: bool | None = None,
) -> np.ndarray:
    """Logits of a preprocessed volume, averaged over mirrorings when TTA is on.

    Args:
        model: network in eval mode.
        image: ``(C, X, Y, Z)`` float32 preprocessed image.
        patch_size: window size.
        cfg: overlap, windows per batch, TTA default.
        device: where to run.
        dtype: autocast dtype or None.
        tta: override ``cfg.tta``.

    Returns:
        ``(K, X, Y, Z)`` float32 logits (K output channels of the model).
    """
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None].to(device)  # a writable copy
    mirrors = MIRROR_AXES if (cfg.tta if tta is None else tta) else ((),)
    total: torch.Tensor | None = None
    for axes in mirrors:
        xi = torch.flip(x, axes) if axes else x
        logits = sliding_window_logits(
            model, xi, patch_size, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
            dtype=dtype,
        )  # fmt: skip
        if axes:
            logits = torch.flip(logits, axes)
        total = logits if total is None else total + logits
    assert total is not None
    return (total / len(mirrors))[0].cpu().numpy()


def foreground_probability(logits: np.ndarray, activation: str) -> np.ndarray:
    """Foreground probability ``(X, Y, Z)`` float32 from ``(K, X, Y, Z)`` logits.

    Sigmoid models have one channel per foreground class; softmax models have the background in
    channel 0. With several foreground classes, the foreground probability is the largest
    class probability (sigmoid) or one minus the background's (softmax).
    """
    t = torch.from_numpy(logits)
    if activation == "sigmoid":
        prob = torch.sigmoid(t).amax(dim=0)
    else:
        prob = 1.0 - torch.softmax(t, dim=0)[0]
    return prob.numpy().astype(np.float32)
