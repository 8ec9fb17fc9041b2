"""Segmentation losses: focal, soft Dice, focal+Dice, Dice+CE and deep supervision.

All losses take logits first, ``logits: (B, C, X, Y, Z) float, not activated`` (any number of
spatial dimensions, at least one), and a target of the same shape holding a one-hot (softmax) or
binary per-channel (sigmoid) mask in {0, 1}, any dtype. The target is a constant: it receives no
gradient. Definitions follow DESIGN ("Loss (exact definitions)"), with
``p = sigmoid(x)`` (or ``softmax`` over channels), ``p_t = t p + (1 - t)(1 - p)`` and
``alpha_t = t alpha + (1 - t)(1 - alpha)``:

- Focal (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017):
  ``FL = alpha_t (1 - p_t)^gamma BCE(x, t)``, mean over all elements.
- Soft Dice (Milletari et al., "V-Net", 3DV 2016):
  ``1 - (2 sum p t + s) / (sum p + sum t + s)`` per sample and channel (or over the batch).
- Dice + cross-entropy as nnU-Net (Isensee et al., "nnU-Net", Nature Methods 2021).
- Blob Dice (after Kofler et al., "blob loss", IPMI 2023): the soft Dice of each connected
  lesion of the target on its own (the other lesions masked out of the prediction), averaged
  over the lesions, so a missed small lesion costs as much as a missed large one; an optional
  term added to any of the above (``loss.lambda_blob``).

The functions are the pure core; the ``nn.Module`` classes only hold their keywords. The sigmoid
focal/Dice path (the default training loss) runs as one fused ``autograd.Function`` that walks the
volume in cache-sized chunks and saves nothing but its inputs for backward, so a 128^3 batch needs
no full-size intermediates (``scripts/bench_loss.py`` measures it against MONAI).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from segmenter.config import ACTIVATIONS, LOSS_NAMES, Activation, LossConfig
from segmenter.evaluation.components import label_components

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)

# Elements per chunk of the fused sigmoid path. On CPU its few scratch buffers (1 MiB each in
# float32) stay in cache and are reused, which beats one pass per op over the whole volume; on
# accelerators one big chunk avoids many small kernel launches.
_CPU_CHUNK = 1 << 18
_DEVICE_CHUNK = 1 << 24


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_params(
    *,
    activation: str = "sigmoid",
    gamma: float = 0.0,
    alpha: float | None = None,
    weight: Sequence[float] | None = None,
    reduction: str = "mean",
    smooth: float = 0.0,
    lambdas: Sequence[float] = (),
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
    if weight is not None and (len(weight) == 0 or any(not w >= 0 for w in weight)):
        raise ValueError(f"weight must be a non-empty sequence of values >= 0, got {weight}")
    if not smooth >= 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    if any(not lam >= 0 for lam in lambdas):
        raise ValueError(f"loss weights (lambdas) must be >= 0, got {tuple(lambdas)}")


def _check_inputs(
    logits: Tensor,
    target: Tensor,
    activation: str,
    weight: Sequence[float] | None = None,
    min_ndim: int = 0,
) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise ValueError("logits and target must be torch tensors")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.shape != target.shape:
        raise ValueError(
            f"logits and target must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)} (the target must be one-hot / binary per channel)"
        )
    if logits.numel() == 0:
        raise ValueError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    if logits.ndim < min_ndim:
        raise ValueError(
            f"expected logits (B, C, *spatial) with at least {min_ndim} dims, "
            f"got shape {tuple(logits.shape)}"
        )
    if activation == "softmax" and (logits.ndim < 2 or logits.shape[1] < 2):
        raise ValueError(
            f"softmax needs logits (B, C, ...) with C >= 2 channels, got {tuple(logits.shape)}"
        )
    if weight is not None:
        n_channels = logits.shape[1] if logits.ndim >= 2 else 1
        if len(weight) != n_channels:
            raise ValueError(
                f"weight has {len(weight)} values but logits have {n_channels} channels "
                f"(shape {tuple(logits.shape)}); give one weight per channel"
            )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision logits (autocast) are evaluated in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _as_bcn(x: Tensor) -> Tensor:
    """View any tensor as (B, C, N): (N,) -> (1, 1, N), (B, C) -> (B, C, 1)."""
    if x.ndim < 2:
        return x.reshape(1, 1, -1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _channel_view(
    values: Sequence[float], ndim: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Per-channel values shaped (1, C, 1, ...) to broadcast against a tensor of ``ndim`` dims.

    Below 2 dims there is one implicit channel: a 0-dim tensor.
    """
    out = torch.tensor(values, dtype=dtype, device=device)
    return out.reshape(()) if ndim < 2 else out.view(1, -1, *[1] * (ndim - 2))


def _dice_start(logits: Tensor, include_background: bool) -> int:
    """First channel of the Dice term: 1 drops the background channel 0.

    A single channel is always kept: with sigmoid it is the foreground, there is no background.
    """
    return 0 if include_background or logits.shape[1] == 1 else 1


# --------------------------------------------------------------------------------------------
# Elementwise terms (autograd-composable; the fused path reuses them in its forward)
# --------------------------------------------------------------------------------------------


def _alpha_t(t: Tensor, alpha: float) -> Tensor:
    # alpha_t = t alpha + (1 - t)(1 - alpha) = (1 - alpha) + t (2 alpha - 1)
    return t * (2.0 * alpha - 1.0) + (1.0 - alpha)


def _sigmoid_focal_terms(
    x: Tensor, t: Tensor, gamma: float, alpha: float | None, weight: Tensor | None
) -> Tensor:
    """Elementwise sigmoid focal loss, same shape as ``x``; stable for any logit magnitude.

    ``BCE = softplus(x) - x t`` (from log-sigmoid) and ``1 - p_t = sigmoid(x (1 - 2 t))``, which
    is exact for t in {0, 1} and never forms ``1 - p`` by cancellation.
    """
    xt = x * t
    loss = -F.logsigmoid(-x) - xt
    if gamma != 0:
        loss = loss * torch.sigmoid(x - 2.0 * xt).pow(gamma)
    if alpha is not None:
        loss = loss * _alpha_t(t, alpha)
    if weight is not None:
        loss = loss * weight
    return loss


def _softmax_focal_terms(
    x: Tensor, t: Tensor, gamma: float, alpha: float | None, weight: Tensor | None
) -> Tensor:
    """Elementwise multi-class focal loss ``-alpha_t (1 - p)^gamma t log p`` over channels.

    For a one-hot target only the true class contributes, so a scalar ``alpha`` scales every
    class alike (DESIGN's alpha_t); per-class balance goes through ``weight``.
    """
    log_p = F.log_softmax(x, dim=1)
    loss = -t * log_p
    if gamma != 0:
        # 1 - p = -expm1(log p) without cancellation; the floor keeps the gradient of the power
        # finite (it is 0 in the limit) when p rounds to 1.
        one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
        loss = loss * one_minus_p.pow(gamma)
    if alpha is not None:
        loss = loss * _alpha_t(t, alpha)
    if weight is not None:
        loss = loss * weight
    return loss


def _dice_from_probs(
    p: Tensor, t: Tensor, smooth: float, batch_dice: bool, sync: Any = None
) -> Tensor:
    """Soft Dice loss per (sample, channel) -> (B, C), or per channel -> (C,) with batch Dice
    (its sums over the ranks of ``sync`` when given, differentiably)."""
    dims = ([0] if batch_dice else []) + list(range(2, p.ndim))
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    if batch_dice and sync is not None:
        inter, denom = sync.sum_with_grad(torch.stack([inter, denom])).unbind(0)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# --------------------------------------------------------------------------------------------
# Fused sigmoid focal + Dice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fused:
    gamma: float
    alpha: float | None
    weight: tuple[float, ...] | None
    focal_scale: float  # multiplies the focal sum (lambda / N for mean); 0 = no focal term
    dice_scale: float  # multiplies the sum of Dice losses (lambda / count for mean); 0 = none
    smooth: float
    batch_dice: bool
    dice_start: int
    sync: Any = None  # batch-Dice statistics summed over data-parallel ranks (sum_, world_size)


def _chunk_len(x3: Tensor) -> int:
    per_chunk = _CPU_CHUNK if x3.device.type == "cpu" else _DEVICE_CHUNK
    return max(1, per_chunk // max(1, x3.shape[0] * x3.shape[1]))


class _SigmoidFocalDice(torch.autograd.Function):
    """``focal_scale * sum(FL) + dice_scale * sum(Dice)`` with a hand-written, chunked backward.

    Gradients (p = sigmoid(x), q = sigmoid(x (1 - 2t)) = 1 - p_t, b = BCE(x, t)):
    ``dFL/dx = alpha_t w q^gamma (gamma (1 - 2t)(1 - q) b + p - t)`` and, per (sample, channel)
    with ``n = 2 sum p t + s``, ``d = sum p + sum t + s``:
    ``dDice/dx = (n / d^2 - 2 t / d) p (1 - p)``.
    Each chunk works in a few preallocated scratch buffers (``out=`` and in-place ops), so no
    full-size tensor is created besides the gradient itself.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, prm: _Fused) -> Tensor:
        x3, t3 = _as_bcn(logits), _as_bcn(target)
        cdt, (nb, nc, nv) = _compute_dtype(logits.dtype), x3.shape
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        c0, step = prm.dice_start, _chunk_len(x3)
        buf1, buf2, buf3 = torch.empty((3, nb, nc, min(step, nv)), dtype=cdt, device=x3.device)
        rows = torch.zeros((4, nb, nc), dtype=torch.float64, device=x3.device)
        for start in range(0, nv, step):
            x = x3[:, :, start : start + step].to(cdt)
            t = t3[:, :, start : start + step].to(cdt)
            n = x.shape[-1]
            b1, b2, b3 = buf1[..., :n], buf2[..., :n], buf3[..., :n]
            if prm.focal_scale:
                xt = torch.mul(x, t, out=b1)
                bce = torch.sub(F.softplus(x), xt, out=b2)  # softplus(x) - x t, stable
                if prm.gamma != 0:
                    q = torch.sub(x, xt, alpha=2.0, out=b3).sigmoid_()  # sigmoid(x (1 - 2t))
                    bce.mul_(q.pow_(prm.gamma))
                if prm.alpha is not None:
                    bce.mul_(torch.mul(t, 2.0 * prm.alpha - 1.0, out=b1).add_(1.0 - prm.alpha))
                rows[0] += bce.sum(-1, dtype=acc)
            if prm.dice_scale:
                p, tc = torch.sigmoid(x[:, c0:], out=b1[:, c0:]), t[:, c0:]
                rows[1, :, c0:] += p.sum(-1, dtype=acc)
                rows[2, :, c0:] += tc.sum(-1, dtype=acc)
                rows[3, :, c0:] += p.mul_(tc).sum(-1, dtype=acc)
        focal = rows[0] if prm.weight is None else rows[0] * torch.tensor(prm.weight).to(rows)
        total = focal.sum() * prm.focal_scale
        if prm.dice_scale:
            stats = rows[1:, :, c0:].sum(1, keepdim=True) if prm.batch_dice else rows[1:, :, c0:]
            if prm.batch_dice and prm.sync is not None:
                stats = prm.sync.sum_(stats.contiguous())
            num = 2.0 * stats[2] + prm.smooth
            den = stats[0] + stats[1] + prm.smooth
            total = total + prm.dice_scale * (1.0 - num / den).sum()
            # d(sum Dice)/dp = coef_t * t + coef_1, per (sample or batch, channel)
            ctx.dice_coef = (-2.0 / den, num / den**2)
        ctx.prm = prm
        ctx.save_for_backward(logits, target)
        return total.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        logits, target = ctx.saved_tensors
        prm: _Fused = ctx.prm
        if not ctx.needs_input_grad[0]:
            return None, None, None
        x3, t3 = _as_bcn(logits), _as_bcn(target)
        cdt, (nb, nc, nv) = _compute_dtype(logits.dtype), x3.shape
        c0, step = prm.dice_start, _chunk_len(x3)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g3 = _as_bcn(grad)
        bufs = torch.empty((4, nb, nc, min(step, nv)), dtype=cdt, device=x3.device)
        same_dtype = cdt == logits.dtype
        g = grad_out.to(cdt)
        focal_g = g * prm.focal_scale
        if prm.weight is not None:
            focal_g = focal_g * _channel_view(prm.weight, 3, cdt, x3.device)
        if prm.dice_scale:
            # summed statistics: this rank's share of the gradient, times the ranks, which
            # DistributedDataParallel's average divides out again
            ranks = prm.sync.world_size if prm.batch_dice and prm.sync is not None else 1
            scale = g * (prm.dice_scale * ranks)
            coef_t, coef_1 = (c.to(cdt).unsqueeze(-1) * scale for c in ctx.dice_coef)
        for start in range(0, nv, step):
            x = x3[:, :, start : start + step].to(cdt)
            t = t3[:, :, start : start + step].to(cdt)
            n = x.shape[-1]
            b1, b2, b3, b4 = (b[..., :n] for b in bufs)
            out = g3[:, :, start : start + n] if same_dtype else torch.empty_like(x)
            p = torch.sigmoid(x, out=b1)
            if prm.focal_scale:
                d = torch.sub(p, t, out=out)  # dBCE/dx
                if prm.gamma != 0:
                    xt = torch.mul(x, t, out=b2)
                    bce = torch.sub(F.softplus(x), xt, out=b3)
                    q = torch.sub(x, xt, alpha=2.0, out=b2).sigmoid_()
                    s_omq = torch.mul(t, -2.0, out=b4).add_(1.0)  # s = 1 - 2t
                    s_omq.addcmul_(s_omq, q, value=-1.0)  # s (1 - q)
                    d.add_(s_omq.mul_(bce), alpha=prm.gamma).mul_(q.pow_(prm.gamma))
                if prm.alpha is not None:
                    d.mul_(torch.mul(t, 2.0 * prm.alpha - 1.0, out=b2).add_(1.0 - prm.alpha))
                d.mul_(focal_g)
            else:
                d = out.zero_()
            if prm.dice_scale:
                pc = p[:, c0:]
                dice = torch.addcmul(coef_1, coef_t, t[:, c0:], out=b2[:, c0:])
                d[:, c0:].add_(dice.mul_(torch.addcmul(pc, pc, pc, value=-1.0, out=b3[:, c0:])))
            if not same_dtype:
                g3[:, :, start : start + n] = out
        return grad, None, None


def _fused(logits: Tensor, target: Tensor, prm: _Fused) -> Tensor:
    return _SigmoidFocalDice.apply(logits, target.detach(), prm)


def _dice_scale(logits: Tensor, c0: int, batch_dice: bool, reduction: str) -> float:
    count = (logits.shape[1] - c0) * (1 if batch_dice else logits.shape[0])
    return 1.0 / count if reduction == "mean" else 1.0


# --------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------


def focal_loss(
    logits: Tensor,
    target: Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    weight: Sequence[float] | None = None,
    activation: Activation = "sigmoid",
    reduction: Reduction = "mean",
) -> Tensor:
    """Focal loss (Lin et al., ICCV 2017): ``FL = alpha_t (1 - p_t)^gamma BCE(x, t)``.

    With ``gamma=0`` and ``alpha=None`` it is exactly ``BCEWithLogitsLoss`` (sigmoid) or
    ``-t log softmax(x)`` per element (softmax). Computed from log-sigmoid (``BCE = softplus(x)
    - x t``) or log-softmax, so the loss and its gradient are finite for any logit magnitude.

    Args:
        logits: (B, C, X, Y, Z) float, not activated. With sigmoid any shape works elementwise,
            e.g. (N, 1) detection scores.
        target: same shape as ``logits``, values in {0, 1} (binary per channel, or one-hot).
        gamma: focusing exponent >= 0.
        alpha: foreground balance in [0, 1] (``alpha_t = t alpha + (1 - t)(1 - alpha)``), or
            None. With softmax only the true class contributes, so it scales every class alike
            (MONAI instead gives channel 0 ``1 - alpha``); use ``weight`` for per-class balance.
        weight: one non-negative weight per channel (dim 1), multiplying its elements, or None.
        activation: ``"sigmoid"`` (independent channels) or ``"softmax"`` (over dim 1).
        reduction: ``"mean"`` over all elements (B * C * voxels), ``"sum"``, or ``"none"``
            (elementwise, same shape as ``logits``).

    Returns:
        A scalar tensor, or the elementwise loss for ``reduction="none"``.

    Raises:
        ValueError: shape mismatch, unknown activation or reduction, out-of-range parameters.
    """
    _check_params(
        activation=activation, gamma=gamma, alpha=alpha, weight=weight, reduction=reduction
    )
    _check_inputs(logits, target, activation, weight)
    if activation == "sigmoid" and reduction != "none":
        scale = 1.0 / logits.numel() if reduction == "mean" else 1.0
        w = None if weight is None else tuple(float(v) for v in weight)
        return _fused(logits, target, _Fused(gamma, alpha, w, scale, 0.0, 0.0, False, 0))
    w_view = None
    if weight is not None:
        w_view = _channel_view(weight, logits.ndim, logits.dtype, logits.device)
    terms = _softmax_focal_terms if activation == "softmax" else _sigmoid_focal_terms
    return _reduce(terms(logits, target.detach(), gamma, alpha, w_view), reduction)


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    activation: Activation = "sigmoid",
    smooth: float = 1e-5,
    batch_dice: bool = False,
    include_background: bool = True,
    reduction: Reduction = "mean",
    sync: Any = None,
) -> Tensor:
    """Soft Dice loss (Milletari et al., 3DV 2016; nnU-Net's batch Dice, Isensee et al. 2021).

    ``1 - (2 sum p t + s) / (sum p + sum t + s)`` summed over the voxels of each (sample,
    channel), or over the whole batch per channel with ``batch_dice``.

    Args:
        logits: (B, C, *spatial) float, not activated.
        target: same shape, values in {0, 1}.
        activation: ``"sigmoid"`` or ``"softmax"`` (over dim 1).
        smooth: s >= 0, added to numerator and denominator.
        batch_dice: sum over the batch before dividing (one Dice per channel).
        include_background: keep channel 0. Ignored for a single channel, which is foreground.
        reduction: ``"mean"``/``"sum"`` over the (B, C) (or (C,)) Dice losses, or ``"none"``.
        sync: with ``batch_dice`` under data-parallel training, the run
            (:class:`segmenter.nn.distributed.Dist`) whose ranks' statistics are summed, so the
            loss is that of the global batch; None for one process.

    Returns:
        A scalar, or (B, C) / (C,) losses for ``reduction="none"``.

    Raises:
        ValueError: shape mismatch, fewer than 3 dims, unknown activation or reduction.
    """
    _check_params(activation=activation, reduction=reduction, smooth=smooth)
    _check_inputs(logits, target, activation, min_ndim=3)
    c0 = _dice_start(logits, include_background)
    if activation == "sigmoid" and reduction != "none":
        scale = _dice_scale(logits, c0, batch_dice, reduction)
        prm = _Fused(0.0, None, None, 0.0, scale, smooth, batch_dice, c0, sync)
        return _fused(logits, target, prm)
    probs = torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)
    dice = _dice_from_probs(probs[:, c0:], target.detach()[:, c0:], smooth, batch_dice, sync)
    return _reduce(dice, reduction)


def focal_dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    weight: Sequence[float] | None = None,
    activation: Activation = "sigmoid",
    smooth: float = 1e-5,
    batch_dice: bool = False,
    include_background: bool = True,
    lambda_focal: float = 1.0,
    lambda_dice: float = 1.0,
    sync: Any = None,
) -> Tensor:
    """``lambda_focal * focal_loss + lambda_dice * soft_dice_loss``, both with mean reduction.

    ``include_background`` applies to the Dice term only (as nnU-Net's CE, the focal term keeps
    every channel; MONAI's ``DiceFocalLoss`` drops channel 0 from both). ``weight`` applies to
    the focal term only. Args are those of :func:`focal_loss` and :func:`soft_dice_loss`.

    Returns:
        A scalar tensor.
    """
    _check_params(
        activation=activation,
        gamma=gamma,
        alpha=alpha,
        weight=weight,
        smooth=smooth,
        lambdas=(lambda_focal, lambda_dice),
    )
    _check_inputs(logits, target, activation, weight, min_ndim=3)
    if activation == "sigmoid":
        c0 = _dice_start(logits, include_background)
        prm = _Fused(
            gamma=gamma,
            alpha=alpha,
            weight=None if weight is None else tuple(float(v) for v in weight),
            focal_scale=lambda_focal / logits.numel(),
            dice_scale=lambda_dice * _dice_scale(logits, c0, batch_dice, "mean"),
            smooth=smooth,
            batch_dice=batch_dice,
            dice_start=c0,
            sync=sync,
        )
        return _fused(logits, target, prm)
    focal = focal_loss(
        logits, target, gamma=gamma, alpha=alpha, weight=weight, activation=activation
    )
    dice = soft_dice_loss(
        logits,
        target,
        activation=activation,
        smooth=smooth,
        batch_dice=batch_dice,
        include_background=include_background,
        sync=sync,
    )
    return lambda_focal * focal + lambda_dice * dice


def dice_ce_loss(
    logits: Tensor,
    target: Tensor,
    *,
    activation: Activation = "sigmoid",
    weight: Sequence[float] | None = None,
    smooth: float = 1e-5,
    batch_dice: bool = False,
    include_background: bool = True,
    lambda_ce: float = 1.0,
    lambda_dice: float = 1.0,
    sync: Any = None,
) -> Tensor:
    """nnU-Net's Dice + cross-entropy (Isensee et al., Nature Methods 2021).

    Softmax: ``torch.nn.CrossEntropyLoss`` on the class-index target ``argmax(target, 1)`` (as
    nnU-Net's ``RobustCrossEntropyLoss``; with ``weight``, torch's weighted mean) plus the soft
    Dice of the softmax probabilities. Sigmoid (nnU-Net's region-based training): BCE-with-logits,
    mean over all elements, ``weight`` scaling each channel, plus the soft Dice of the sigmoid
    probabilities. nnU-Net returns ``-dice`` where this returns ``1 - dice``: a constant offset,
    the gradients are the same. nnU-Net uses ``include_background=False`` with softmax.

    Args:
        logits: (B, C, *spatial) float, not activated.
        target: same shape, one-hot (softmax) or binary per channel (sigmoid).
        activation, weight, smooth, batch_dice, include_background: as :func:`focal_dice_loss`.
        lambda_ce: weight of the cross-entropy term, >= 0.
        lambda_dice: weight of the Dice term, >= 0.

    Returns:
        A scalar tensor.
    """
    if activation == "sigmoid":
        return focal_dice_loss(
            logits,
            target,
            gamma=0.0,
            weight=weight,
            smooth=smooth,
            batch_dice=batch_dice,
            include_background=include_background,
            lambda_focal=lambda_ce,
            lambda_dice=lambda_dice,
            sync=sync,
        )
    _check_params(
        activation=activation, weight=weight, smooth=smooth, lambdas=(lambda_ce, lambda_dice)
    )
    _check_inputs(logits, target, activation, weight, min_ndim=3)
    w = None if weight is None else torch.tensor(weight, dtype=logits.dtype, device=logits.device)
    ce = F.cross_entropy(logits, target.detach().argmax(1), weight=w)
    dice = soft_dice_loss(
        logits,
        target,
        activation="softmax",
        smooth=smooth,
        batch_dice=batch_dice,
        include_background=include_background,
        sync=sync,
    )
    return lambda_ce * ce + lambda_dice * dice


# --------------------------------------------------------------------------------------------
# Deep supervision (nnU-Net)
# --------------------------------------------------------------------------------------------


def nnunet_deep_supervision_weights(n_outputs: int) -> tuple[float, ...]:
    """nnU-Net's deep-supervision weights for ``n_outputs`` outputs, highest resolution first.

    ``w_i = 1 / 2^i``, the lowest-resolution output gets 0 (nnU-Net v2 does this so the coarsest
    map does not drive training), then normalised to sum 1: 4 outputs give (4/7, 2/7, 1/7, 0).
    A single output gets weight 1.

    Raises:
        ValueError: ``n_outputs < 1``.
    """
    if n_outputs < 1:
        raise ValueError(f"deep supervision needs at least one output, got {n_outputs}")
    if n_outputs == 1:
        return (1.0,)
    raw = [0.5**i for i in range(n_outputs - 1)] + [0.0]
    total = math.fsum(raw)
    return tuple(w / total for w in raw)


def downsample_target(target: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """Nearest-neighbour ("nearest-exact", as nnU-Net v2) resize of (B, C, *spatial) targets.

    Returns ``target`` itself when the shape already matches; the dtype is kept.
    """
    if tuple(target.shape[2:]) == tuple(spatial_shape):
        return target
    if len(spatial_shape) != target.ndim - 2:
        raise ValueError(
            f"cannot resize target {tuple(target.shape)} to spatial shape {tuple(spatial_shape)}"
        )
    src = target if target.is_floating_point() else target.float()
    out = F.interpolate(src, size=tuple(spatial_shape), mode="nearest-exact")
    return out.to(target.dtype)


def deep_supervision_loss(
    loss: Callable[[Tensor, Tensor], Tensor],
    outputs: Sequence[Tensor],
    target: Tensor,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Weighted sum of ``loss`` over deep-supervision outputs (nnU-Net, Isensee et al. 2021).

    Args:
        loss: a loss taking ``(logits, target)``.
        outputs: logits (B, C, *spatial_i), highest resolution first, decreasing.
        target: (B, C, *spatial) at the resolution of the first output; resized to each output
            with :func:`downsample_target`.
        weights: one weight per output, used as given; None means
            :func:`nnunet_deep_supervision_weights`. Outputs with weight 0 are not evaluated.

    Returns:
        A scalar tensor ``sum_i w_i loss(outputs[i], downsample(target))``.

    Raises:
        ValueError: no outputs, wrong number of weights, negative weights, batch/channel mismatch.
    """
    if not isinstance(outputs, (list, tuple)) or len(outputs) == 0:
        raise ValueError("deep supervision needs a non-empty list or tuple of logits")
    ws = nnunet_deep_supervision_weights(len(outputs)) if weights is None else tuple(weights)
    if len(ws) != len(outputs):
        raise ValueError(f"got {len(ws)} deep supervision weights for {len(outputs)} outputs")
    if any(not w >= 0 for w in ws) or not any(w > 0 for w in ws):
        raise ValueError(f"deep supervision weights must be >= 0, not all 0, got {ws}")
    total: Tensor | None = None
    for w, out in zip(ws, outputs, strict=True):
        if out.shape[:2] != target.shape[:2] or out.ndim != target.ndim:
            raise ValueError(
                f"deep supervision output {tuple(out.shape)} does not match target "
                f"{tuple(target.shape)} in batch, channels or number of dims"
            )
        if w == 0:
            continue
        term = w * loss(out, downsample_target(target, out.shape[2:]))
        total = term if total is None else total + term
    assert total is not None
    return total


# --------------------------------------------------------------------------------------------
# Modules: keyword holders around the functional core
# --------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Holds validated keywords as attributes and calls a pure loss function with them."""

    _fn: ClassVar[Callable[..., Tensor]]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        if kwargs.get("weight") is not None:
            kwargs["weight"] = tuple(float(w) for w in kwargs["weight"])
        checked = {k: v for k, v in kwargs.items() if k in _CHECKED_KEYS}
        lambdas = [v for k, v in kwargs.items() if k.startswith("lambda_")]
        _check_params(**checked, lambdas=lambdas)
        self._keys = tuple(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Args: logits (B, C, *spatial) float, not activated; target, same shape, in {0, 1}."""
        return type(self)._fn(logits, target, **{k: getattr(self, k) for k in self._keys})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self._keys)


_CHECKED_KEYS = ("activation", "gamma", "alpha", "weight", "reduction", "smooth")


def _sync_key(sync: Any) -> dict[str, Any]:
    """The ``sync`` keyword only when given, so one-process modules stay as they were."""
    return {} if sync is None else {"sync": sync}


def blob_dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    activation: Activation = "sigmoid",
    smooth: float = 1e-5,
    connectivity: int = 26,
) -> Tensor:
    """Mean over the target's lesions of ``1 - Dice(p masked to the lesion, the lesion)``.

    For each sample, foreground channel and connected component ``k`` of ``target > 0``: the
    prediction keeps every voxel but those of the other components (``M_k``), and
    ``Dice_k = (2 sum p t_k + s) / (sum p M_k + sum t_k + s)``. With ``L`` the component labels
    this is ``sum p M_k = sum p - sum p t + sum p t_k``: one scatter-add per sample and channel,
    whatever the number of lesions. Samples without lesions add nothing; a batch without any
    returns 0 (with a gradient path).

    Args:
        logits: (B, C, X, Y, Z) float, not activated.
        target: same shape, values in {0, 1}.
        activation: ``"sigmoid"`` (every channel is a foreground) or ``"softmax"`` (channel 0
            is the background and is skipped).
        smooth: s >= 0.
        connectivity: 6, 18 or 26 for the target's components (:func:`label_components`).

    Raises:
        ValueError: shape mismatch, not 5 dims, unknown activation.
    """
    _check_params(activation=activation, smooth=smooth)
    _check_inputs(logits, target, activation, min_ndim=5)
    if logits.ndim != 5:
        raise ValueError(f"blob_dice_loss needs (B, C, X, Y, Z) logits, got {tuple(logits.shape)}")
    x = logits.to(_compute_dtype(logits.dtype))
    probs = torch.softmax(x, 1) if activation == "softmax" else torch.sigmoid(x)
    masks = (target.detach() > 0).cpu().numpy()
    losses = []
    for b in range(logits.shape[0]):
        for c in range(1 if activation == "softmax" else 0, logits.shape[1]):
            labels, n = label_components(masks[b, c], connectivity)
            if n == 0:
                continue
            index = torch.from_numpy(labels.astype(np.int64).ravel()).to(probs.device)
            p = probs[b, c].reshape(-1)
            inside = torch.zeros(n + 1, dtype=p.dtype, device=p.device).index_add(0, index, p)
            sizes = torch.bincount(index, minlength=n + 1)[1:].to(p.dtype)
            on_lesions = inside[1:]
            predicted = p.sum() - on_lesions.sum() + on_lesions
            dice = (2 * on_lesions + smooth) / (predicted + sizes + smooth)
            losses.append((1 - dice).mean())
    if not losses:
        return logits.sum() * 0.0
    return torch.stack(losses).mean()


class BlobDiceLoss(nn.Module):
    """``loss(logits, target) + lambda_blob * blob_dice_loss(logits, target)``.

    Args:
        loss: the base loss module (focal+Dice, Dice+CE, ...).
        lambda_blob: weight of :func:`blob_dice_loss` (> 0).
        activation: as the base loss.
        smooth: the Dice smoothing.
    """

    def __init__(
        self, loss: nn.Module, lambda_blob: float, activation: Activation, smooth: float
    ) -> None:
        super().__init__()
        if not lambda_blob > 0:
            raise ValueError(f"lambda_blob must be > 0, got {lambda_blob}")
        self.loss = loss
        self.lambda_blob = float(lambda_blob)
        self.activation = activation
        self.smooth = float(smooth)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        blob = blob_dice_loss(logits, target, activation=self.activation, smooth=self.smooth)
        return self.loss(logits, target) + self.lambda_blob * blob


class FocalLoss(_LossModule):
    """Module form of :func:`focal_loss` (Lin et al. 2017). Call as ``loss(logits, target)``."""

    _fn = staticmethod(focal_loss)

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = None,
        weight: Sequence[float] | None = None,
        reduction: Reduction = "mean",
        activation: Activation = "sigmoid",
    ) -> None:
        super().__init__(gamma=gamma, alpha=alpha, weight=weight, reduction=reduction,
                         activation=activation)  # fmt: skip


class SoftDiceLoss(_LossModule):
    """Module form of :func:`soft_dice_loss` (Milletari et al. 2016; Isensee et al. 2021)."""

    _fn = staticmethod(soft_dice_loss)

    def __init__(
        self,
        activation: Activation = "sigmoid",
        smooth: float = 1e-5,
        batch_dice: bool = False,
        include_background: bool = True,
        reduction: Reduction = "mean",
        sync: Any = None,
    ) -> None:
        super().__init__(activation=activation, smooth=smooth, batch_dice=batch_dice,
                         include_background=include_background, reduction=reduction,
                         **_sync_key(sync))  # fmt: skip


class FocalDiceLoss(_LossModule):
    """Module form of :func:`focal_dice_loss`: ``lambda_focal * FL + lambda_dice * Dice``."""

    _fn = staticmethod(focal_dice_loss)

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = None,
        weight: Sequence[float] | None = None,
        activation: Activation = "sigmoid",
        smooth: float = 1e-5,
        batch_dice: bool = False,
        include_background: bool = True,
        lambda_focal: float = 1.0,
        lambda_dice: float = 1.0,
        sync: Any = None,
    ) -> None:
        super().__init__(gamma=gamma, alpha=alpha, weight=weight, activation=activation,
                         smooth=smooth, batch_dice=batch_dice,
                         include_background=include_background, lambda_focal=lambda_focal,
                         lambda_dice=lambda_dice, **_sync_key(sync))  # fmt: skip


class DiceCELoss(_LossModule):
    """Module form of :func:`dice_ce_loss` (nnU-Net's Dice + CE; BCE with sigmoid)."""

    _fn = staticmethod(dice_ce_loss)

    def __init__(
        self,
        activation: Activation = "sigmoid",
        weight: Sequence[float] | None = None,
        smooth: float = 1e-5,
        batch_dice: bool = False,
        include_background: bool = True,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        sync: Any = None,
    ) -> None:
        super().__init__(activation=activation, weight=weight, smooth=smooth,
                         batch_dice=batch_dice, include_background=include_background,
                         lambda_ce=lambda_ce, lambda_dice=lambda_dice,
                         **_sync_key(sync))  # fmt: skip


class DeepSupervisionLoss(nn.Module):
    """Applies ``loss`` to one output, or :func:`deep_supervision_loss` to a list/tuple of them.

    Args:
        loss: the per-output loss module.
        weights: per-output weights (highest resolution first), used as given; None uses
            :func:`nnunet_deep_supervision_weights` for however many outputs the model returns.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else tuple(float(w) for w in weights)

    def forward(self, logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(logits, Tensor):
            return self.loss(logits, target)
        return deep_supervision_loss(self.loss, logits, target, self.weights)


def build_loss(cfg: LossConfig, *, sync: Any = None) -> nn.Module:
    """The training loss named by ``cfg``, wrapped for deep supervision.

    ``focal_dice``: :class:`FocalDiceLoss`; ``dice_ce``: :class:`DiceCELoss` with
    ``lambda_ce = cfg.lambda_focal``; ``dice``: :class:`SoftDiceLoss`; ``focal``:
    :class:`FocalLoss` (the lambdas only weight the terms of the combined presets); with
    ``cfg.lambda_blob > 0`` the per-lesion :func:`blob_dice_loss` is added. The result
    accepts one logits tensor or a list of deep-supervision outputs
    (``cfg.deep_supervision_weights``, None = nnU-Net's rule); the inner loss is ``.loss``.
    ``sync`` (a :class:`segmenter.nn.distributed.Dist`) sums batch-Dice statistics over
    data-parallel ranks when ``cfg.batch_dice``; None (one process) changes nothing.

    Raises:
        ValueError: unknown name or activation, or out-of-range values.
    """
    if cfg.name not in LOSS_NAMES:
        raise ValueError(f"unknown loss name {cfg.name!r}; valid: {', '.join(LOSS_NAMES)}")
    weight = None if cfg.weight is None else tuple(cfg.weight)
    base: nn.Module
    if cfg.name == "focal_dice":
        base = FocalDiceLoss(
            gamma=cfg.gamma,
            alpha=cfg.alpha,
            weight=weight,
            activation=cfg.activation,
            smooth=cfg.smooth,
            batch_dice=cfg.batch_dice,
            include_background=cfg.include_background,
            sync=sync if cfg.batch_dice else None,
            lambda_focal=cfg.lambda_focal,
            lambda_dice=cfg.lambda_dice,
        )
    elif cfg.name == "dice_ce":
        base = DiceCELoss(
            activation=cfg.activation,
            weight=weight,
            smooth=cfg.smooth,
            batch_dice=cfg.batch_dice,
            include_background=cfg.include_background,
            sync=sync if cfg.batch_dice else None,
            lambda_ce=cfg.lambda_focal,
            lambda_dice=cfg.lambda_dice,
        )
    elif cfg.name == "dice":
        base = SoftDiceLoss(
            activation=cfg.activation,
            smooth=cfg.smooth,
            batch_dice=cfg.batch_dice,
            include_background=cfg.include_background,
            sync=sync if cfg.batch_dice else None,
        )
    else:
        base = FocalLoss(gamma=cfg.gamma, alpha=cfg.alpha, weight=weight, activation=cfg.activation)
    if cfg.lambda_blob > 0:
        base = BlobDiceLoss(base, cfg.lambda_blob, cfg.activation, cfg.smooth)
    return DeepSupervisionLoss(base, cfg.deep_supervision_weights)
