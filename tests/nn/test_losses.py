"""Losses: DESIGN golden values, MONAI / torch / Ultralytics oracles, gradients, composition."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import monai.losses as ml
import pytest
import torch
import torch.nn.functional as F

from segmenter.config import LossConfig
from segmenter.nn import losses as L

ATOL = 1e-6

# DESIGN "Loss (exact definitions)": one sample, one channel.
DESIGN_LOGITS = [2.0, -1.0, 0.5, -3.0]
DESIGN_LABELS = [1.0, 0.0, 0.0, 1.0]
TUTORIAL_LOGITS = [[0.8], [-1.5], [0.1]]
TUTORIAL_LABELS = [[1.0], [0.0], [1.0]]


def make_pair(
    shape: tuple[int, ...],
    activation: str = "sigmoid",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    scale: float = 2.0,
    positive: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and a binary (sigmoid) or one-hot (softmax) target of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if activation == "softmax":
        labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
        target = F.one_hot(labels, shape[1]).movedim(-1, 1).to(dtype)
    else:
        target = (torch.rand(shape, generator=gen) < positive).to(dtype)
    return logits, target


def ultralytics_focal(pred: torch.Tensor, true: torch.Tensor, gamma: float, alpha: float):
    """Ultralytics/YOLOv5 convention, written from its documented formula and reduction:
    BCE-with-logits times alpha_t times (1 - p_t)^gamma, reduced as ``loss.mean(1).sum()``."""
    bce = F.binary_cross_entropy_with_logits(pred, true, reduction="none")
    prob = torch.sigmoid(pred)
    p_t = true * prob + (1 - true) * (1 - prob)
    alpha_t = true * alpha + (1 - true) * (1 - alpha)
    return (bce * alpha_t * (1.0 - p_t) ** gamma).mean(1).sum()


# --------------------------------------------------------------------------------------------
# Golden values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"gamma": 0.0}, 1.115714),
        ({"gamma": 2.0}, 0.792038),
        ({"gamma": 1.5, "alpha": 0.25}, 0.275356),
        ({"gamma": 1.5, "alpha": 0.25, "reduction": "sum"}, 1.101425),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_design_reference_values(kwargs: dict, expected: float, dtype: torch.dtype) -> None:
    x = torch.tensor([[DESIGN_LOGITS]], dtype=dtype)
    t = torch.tensor([[DESIGN_LABELS]], dtype=dtype)
    assert L.FocalLoss(**kwargs)(x, t).item() == pytest.approx(expected, abs=1e-6)
    assert L.focal_loss(x, t, **kwargs).item() == pytest.approx(expected, abs=1e-6)


def test_tutorial_example_runs_as_written() -> None:
    loss = L.FocalLoss(gamma=1.5)(
        torch.tensor([[0.8], [-1.5], [0.1]]), torch.tensor([[1.0], [0.0], [1.0]])
    )
    assert loss.ndim == 0 and math.isfinite(loss.item())
    x, t = torch.tensor(TUTORIAL_LOGITS), torch.tensor(TUTORIAL_LABELS)
    ultralytics = L.FocalLoss(gamma=1.5, alpha=0.25, reduction="sum")(x, t)
    assert ultralytics.item() == pytest.approx(0.080528, abs=1e-6)


@pytest.mark.parametrize("shape", [(3, 1), (1, 1, 4), (4, 3), (2, 5, 3, 3)])
@pytest.mark.parametrize(("gamma", "alpha"), [(1.5, 0.25), (2.0, 0.5), (0.0, 0.75)])
def test_ultralytics_reduction_convention(shape: tuple, gamma: float, alpha: float) -> None:
    x, t = make_pair(shape, seed=3)
    ref = ultralytics_focal(x, t, gamma, alpha)
    ours = L.focal_loss(x, t, gamma=gamma, alpha=alpha, reduction="none").mean(1).sum()
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    if shape[1] == 1:  # mean over a size-1 dim: Ultralytics' reduction is our "sum"
        ours_sum = L.focal_loss(x, t, gamma=gamma, alpha=alpha, reduction="sum")
        torch.testing.assert_close(ours_sum, ref, atol=1e-10, rtol=1e-10)


def test_design_values_against_ultralytics_formula() -> None:
    x = torch.tensor([[DESIGN_LOGITS]], dtype=torch.float64)
    t = torch.tensor([[DESIGN_LABELS]], dtype=torch.float64)
    assert ultralytics_focal(x, t, 1.5, 0.25).item() == pytest.approx(1.101425, abs=1e-6)


# --------------------------------------------------------------------------------------------
# torch and MONAI oracles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5,), (3, 1), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma_zero_is_bce_with_logits(reduction: str, shape: tuple, dtype: torch.dtype) -> None:
    x, t = make_pair(shape, seed=1, dtype=dtype, scale=5.0)
    ours = L.FocalLoss(gamma=0.0, reduction=reduction)(x, t)
    ref = torch.nn.BCEWithLogitsLoss(reduction=reduction)(x, t)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-6)


FOCAL_GRID = list(
    itertools.product([0.0, 0.5, 2.0, 3.5], [None, 0.25, 0.8], [None, (0.2, 1.0, 3.0)])
)


@pytest.mark.parametrize(("gamma", "alpha", "weight"), FOCAL_GRID)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sigmoid_focal_equals_monai(gamma, alpha, weight, reduction: str) -> None:
    x, t = make_pair((2, 3, 6, 5, 4), seed=2)
    ours = L.focal_loss(x, t, gamma=gamma, alpha=alpha, weight=weight, reduction=reduction)
    ref = ml.FocalLoss(gamma=gamma, alpha=alpha, weight=weight, reduction=reduction)(x, t)
    # MONAI's FocalLoss computes in float32: elementwise values up to ~20 carry float32 rounding
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=ATOL, rtol=1e-6)


def test_sigmoid_focal_sum_is_plain_sum() -> None:
    # MONAI's "sum" averages the spatial dims before summing; DESIGN's sum (= Ultralytics for a
    # size-1 dim 1) is the plain sum of the elementwise loss, which equals MONAI's "none".sum().
    x, t = make_pair((2, 3, 6, 5, 4), seed=4)
    ours = L.focal_loss(x, t, gamma=1.5, alpha=0.25, reduction="sum")
    ref = ml.FocalLoss(gamma=1.5, alpha=0.25, reduction="none")(x, t).sum()
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=1e-5, rtol=1e-6)


def test_sigmoid_focal_soft_targets_follow_monai() -> None:
    x, _ = make_pair((2, 3, 5, 4, 3), seed=5)
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = L.focal_loss(x, t, gamma=2.0, alpha=0.3)
    torch.testing.assert_close(
        ours, ml.FocalLoss(gamma=2.0, alpha=0.3)(x, t).double(), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(("gamma", "alpha", "weight"), FOCAL_GRID)
def test_softmax_focal_equals_monai(gamma, alpha, weight) -> None:
    # MONAI's softmax focal gives channel 0 a scalar alpha's complement (1 - alpha) and every
    # other channel alpha; DESIGN's alpha_t = t alpha + (1 - t)(1 - alpha) is alpha for the one
    # true class of a one-hot target, so our scalar alpha maps to MONAI's alpha=[alpha] * C.
    x, t = make_pair((2, 3, 6, 5, 4), "softmax", seed=6)
    ours = L.focal_loss(x, t, gamma=gamma, alpha=alpha, weight=weight, activation="softmax")
    monai_alpha = None if alpha is None else [alpha] * 3
    ref = ml.FocalLoss(gamma=gamma, alpha=monai_alpha, weight=weight, use_softmax=True)(x, t)
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=ATOL, rtol=0)


def test_softmax_focal_gamma_zero_is_cross_entropy_per_element() -> None:
    x, t = make_pair((2, 4, 5, 4, 3), "softmax", seed=7)
    ours = L.focal_loss(x, t, gamma=0.0, activation="softmax")
    torch.testing.assert_close(ours * 4, F.cross_entropy(x, t.argmax(1)), atol=1e-12, rtol=0)


DICE_GRID = list(itertools.product([False, True], [True, False], [1e-5, 1.0, 0.0]))


@pytest.mark.parametrize(("batch_dice", "include_background", "smooth"), DICE_GRID)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dice_equals_monai(batch_dice, include_background, smooth, activation, reduction) -> None:
    x, t = make_pair((2, 3, 6, 5, 4), activation, seed=8)
    ours = L.SoftDiceLoss(
        activation=activation,
        smooth=smooth,
        batch_dice=batch_dice,
        include_background=include_background,
        reduction=reduction,
    )(x, t)
    ref = ml.DiceLoss(
        include_background=include_background,
        sigmoid=activation == "sigmoid",
        softmax=activation == "softmax",
        smooth_nr=smooth,
        smooth_dr=smooth,
        batch=batch_dice,
        reduction=reduction,
    )(x, t)
    torch.testing.assert_close(ours.reshape(-1), ref.reshape(-1), atol=ATOL, rtol=0)


DICE_FOCAL_GRID = list(
    itertools.product(
        [0.0, 2.0], [None, 0.25], [False, True], [1e-5, 1.0], [(1.0, 1.0), (0.3, 2.0)]
    )
)


@pytest.mark.parametrize(("gamma", "alpha", "batch_dice", "smooth", "lambdas"), DICE_FOCAL_GRID)
@pytest.mark.parametrize("channels", [1, 3])
def test_sigmoid_focal_dice_equals_monai(gamma, alpha, batch_dice, smooth, lambdas, channels):
    x, t = make_pair((2, channels, 6, 5, 4), seed=9)
    lf, ld = lambdas
    ours_module = L.FocalDiceLoss(
        gamma=gamma,
        alpha=alpha,
        smooth=smooth,
        batch_dice=batch_dice,
        lambda_focal=lf,
        lambda_dice=ld,
    )
    ref_module = ml.DiceFocalLoss(
        sigmoid=True,
        gamma=gamma,
        alpha=alpha,
        smooth_nr=smooth,
        smooth_dr=smooth,
        batch=batch_dice,
        lambda_focal=lf,
        lambda_dice=ld,
    )
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = ours_module(xo, t), ref_module(xr, t)
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=ATOL, rtol=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("gamma", "alpha", "batch_dice"), [(2.0, None, False), (1.5, 0.25, True)])
def test_focal_dice_without_background_follows_design(activation, gamma, alpha, batch_dice):
    # Two deliberate differences from MONAI's DiceFocalLoss, both following DESIGN / LossConfig:
    # include_background only drops channel 0 from the Dice term (MONAI drops it from the focal
    # term too), and with softmax the focal term is the softmax focal (MONAI keeps a sigmoid
    # focal). The oracle is therefore MONAI's DiceLoss + FocalLoss composed by hand.
    x, t = make_pair((2, 3, 6, 5, 4), activation, seed=10)
    softmax = activation == "softmax"
    ours = L.focal_dice_loss(
        x,
        t,
        gamma=gamma,
        alpha=alpha,
        activation=activation,
        batch_dice=batch_dice,
        include_background=False,
        lambda_focal=0.7,
        lambda_dice=1.3,
    )
    monai_alpha = [alpha] * 3 if softmax and alpha is not None else alpha
    dice = ml.DiceLoss(
        include_background=False, sigmoid=not softmax, softmax=softmax, batch=batch_dice
    )(x, t)
    focal = ml.FocalLoss(gamma=gamma, alpha=monai_alpha, use_softmax=softmax)(x, t)
    torch.testing.assert_close(ours, 0.7 * focal.double() + 1.3 * dice, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("activation", "channels"), [("sigmoid", 1), ("softmax", 3)])
@pytest.mark.parametrize(("batch_dice", "lambdas"), [(False, (1.0, 1.0)), (True, (0.5, 2.0))])
def test_dice_ce_equals_monai(activation, channels, batch_dice, lambdas) -> None:
    x, t = make_pair((2, channels, 6, 5, 4), activation, seed=11)
    ours = L.DiceCELoss(
        activation=activation, batch_dice=batch_dice, lambda_ce=lambdas[0], lambda_dice=lambdas[1]
    )(x, t)
    ref = ml.DiceCELoss(
        sigmoid=activation == "sigmoid",
        softmax=activation == "softmax",
        batch=batch_dice,
        lambda_ce=lambdas[0],
        lambda_dice=lambdas[1],
    )(x, t)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_dice_ce_weighted_softmax_is_nnunet_cross_entropy() -> None:
    # nnU-Net's CE is torch's CrossEntropyLoss on the class-index target (weighted mean with
    # weights); MONAI passes the one-hot target as probabilities, which normalises differently.
    x, t = make_pair((2, 3, 6, 5, 4), "softmax", seed=12)
    weight = (0.2, 1.0, 3.0)
    ours = L.dice_ce_loss(x, t, activation="softmax", weight=weight, include_background=False)
    ce = torch.nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=x.dtype))(x, t.argmax(1))
    dice = ml.DiceLoss(include_background=False, softmax=True)(x, t)
    torch.testing.assert_close(ours, ce + dice, atol=ATOL, rtol=0)


def test_dice_ce_sigmoid_multichannel_is_bce() -> None:
    # With several sigmoid channels MONAI's DiceCELoss switches to softmax cross-entropy; the
    # issue asks for BCE with sigmoid, so the oracle is BCEWithLogitsLoss + MONAI's DiceLoss.
    x, t = make_pair((2, 3, 6, 5, 4), seed=13)
    ours = L.dice_ce_loss(x, t, weight=(0.5, 1.0, 2.0))
    bce = F.binary_cross_entropy_with_logits(
        x, t, weight=torch.tensor([0.5, 1.0, 2.0], dtype=x.dtype).view(1, 3, 1, 1, 1)
    )
    torch.testing.assert_close(ours, bce + ml.DiceLoss(sigmoid=True)(x, t), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Stability and gradients
# --------------------------------------------------------------------------------------------


def all_losses() -> list[tuple[str, Callable]]:
    return [
        ("focal", lambda x, t, a: L.focal_loss(x, t, gamma=2.0, alpha=0.25, activation=a)),
        ("focal_g05", lambda x, t, a: L.focal_loss(x, t, gamma=0.5, activation=a)),
        ("focal_none", lambda x, t, a: L.focal_loss(x, t, activation=a, reduction="none").sum()),
        ("dice", lambda x, t, a: L.soft_dice_loss(x, t, activation=a)),
        ("dice_batch_nobg", lambda x, t, a: L.soft_dice_loss(
            x, t, activation=a, batch_dice=True, include_background=False)),
        ("focal_dice", lambda x, t, a: L.focal_dice_loss(
            x, t, gamma=1.5, alpha=0.3, weight=(1.0, 2.0, 0.5), activation=a, lambda_dice=0.5)),
        ("focal_dice_nobg", lambda x, t, a: L.focal_dice_loss(
            x, t, activation=a, include_background=False, batch_dice=True)),
        ("dice_ce", lambda x, t, a: L.dice_ce_loss(x, t, activation=a, weight=(1.0, 2.0, 0.5))),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "fn"), all_losses())
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_for_extreme_logits(name: str, fn: Callable, activation: str, dtype) -> None:
    _, t = make_pair((2, 3, 4, 3, 2), activation, seed=14, dtype=dtype)
    signs = torch.where(
        torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1, 1
    )
    x = (100.0 * signs).to(dtype).requires_grad_()
    loss = fn(x, t, activation)
    loss.backward()
    assert torch.isfinite(loss), name
    assert torch.isfinite(x.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_have_exact_limits(dtype: torch.dtype) -> None:
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0]], dtype=dtype)
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=dtype)
    loss = L.focal_loss(x, t, gamma=0.0, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([[0.0, 0.0, 100.0, 100.0]], dtype=dtype))


@pytest.mark.parametrize(("name", "fn"), all_losses())
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_gradcheck_float64(name, fn, activation) -> None:
    x, t = make_pair((2, 3, 3, 2, 2), activation, seed=15)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: fn(v, t, activation), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs", [{}, {"gamma": 0.5, "alpha": 0.7}, {"gamma": 3.0, "weight": (2.0,)}]
)
def test_gradcheck_elementwise_focal(kwargs: dict) -> None:
    x, t = make_pair((6, 1), seed=16)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: L.focal_loss(v, t, **kwargs), (x,))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"gamma": 0.0},
        {"gamma": 2.5, "alpha": 0.25, "weight": (0.5, 2.0, 1.0)},
        {"batch_dice": True, "include_background": False, "smooth": 1.0},
        {"lambda_focal": 0.0},
        {"lambda_dice": 0.0},
    ],
)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3), (2, 3, 36, 36, 36)], ids=["one", "two"])
def test_fused_path_matches_autograd_composition(kwargs: dict, shape: tuple[int, ...]) -> None:
    # The fused sigmoid path walks the volume in chunks of 2^18 elements on the CPU: the 36^3
    # volume (6 x 46656 elements) takes two, the second partial, so its backward crosses a border.
    x, t = make_pair(shape, seed=17, dtype=torch.float32)
    gamma, alpha, weight = kwargs.get("gamma", 2.0), kwargs.get("alpha"), kwargs.get("weight")
    lf, ld = kwargs.get("lambda_focal", 1.0), kwargs.get("lambda_dice", 1.0)
    dice_kwargs = {
        k: kwargs[k] for k in ("batch_dice", "include_background", "smooth") if k in kwargs
    }
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = L.focal_dice_loss(xf, t, **kwargs)
    # reference: elementwise focal ("none" is plain autograd) + softmax-free Dice from probs
    focal = L.focal_loss(xr, t, gamma=gamma, alpha=alpha, weight=weight, reduction="none").mean()
    dice = L.soft_dice_loss(xr, t, reduction="none", **dice_kwargs).mean()
    ref = lf * focal + ld * dice
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-6)
    fused.backward()
    ref.backward()
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-9, rtol=1e-4)


def test_half_precision_logits_are_evaluated_in_float32() -> None:
    x, t = make_pair((2, 1, 8, 8, 8), seed=18, dtype=torch.float32)
    xb = x.to(torch.bfloat16).requires_grad_()
    loss = L.focal_dice_loss(xb, t)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    ref = L.focal_dice_loss(xb.detach().float(), t)
    assert loss.float().item() == pytest.approx(ref.item(), rel=1e-2)


# --------------------------------------------------------------------------------------------
# Composition, deep supervision, presets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("lf", "ld"), [(1.0, 1.0), (0.25, 3.0), (0.0, 1.0), (2.0, 0.0)])
@pytest.mark.parametrize(("batch_dice", "include_background"), [(False, True), (True, False)])
def test_focal_dice_is_weighted_sum(activation, lf, ld, batch_dice, include_background) -> None:
    x, t = make_pair((2, 3, 5, 4, 3), activation, seed=19)
    focal = L.FocalLoss(gamma=1.5, alpha=0.4, weight=(1.0, 2.0, 0.5), activation=activation)
    dice = L.SoftDiceLoss(
        activation=activation, batch_dice=batch_dice, include_background=include_background
    )
    combined = L.FocalDiceLoss(
        gamma=1.5,
        alpha=0.4,
        weight=(1.0, 2.0, 0.5),
        activation=activation,
        batch_dice=batch_dice,
        include_background=include_background,
        lambda_focal=lf,
        lambda_dice=ld,
    )
    torch.testing.assert_close(
        combined(x, t), lf * focal(x, t) + ld * dice(x, t), atol=1e-12, rtol=0
    )


def test_forward_does_not_mutate_module() -> None:
    x, t = make_pair((2, 3, 4, 4, 4), seed=20)
    for module in (
        L.FocalLoss(weight=(1.0, 2.0, 3.0)),
        L.SoftDiceLoss(include_background=False),
        L.FocalDiceLoss(),
        L.DiceCELoss(activation="softmax"),
    ):
        before = dict(vars(module))
        module(x, t)
        assert dict(vars(module)) == before
        assert not module.state_dict()


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, (1.0,)), (2, (1.0, 0.0)), (3, (2 / 3, 1 / 3, 0.0)), (4, (4 / 7, 2 / 7, 1 / 7, 0.0))],
)
def test_nnunet_deep_supervision_weights(n: int, expected: tuple) -> None:
    weights = L.nnunet_deep_supervision_weights(n)
    assert weights == pytest.approx(expected)
    assert math.fsum(weights) == pytest.approx(1.0)


def test_downsample_target_is_nearest_exact() -> None:
    t = (torch.rand((1, 2, 8, 8, 6), generator=torch.Generator().manual_seed(21)) < 0.5).float()
    # nearest-exact samples source index floor((i + 0.5) * 2) = 2i + 1
    torch.testing.assert_close(L.downsample_target(t, (4, 4, 3)), t[..., 1::2, 1::2, 1::2])
    assert L.downsample_target(t, (8, 8, 6)) is t
    as_bytes = L.downsample_target(t.to(torch.uint8), (4, 4, 3))
    assert as_bytes.dtype == torch.uint8


def ds_outputs(seed: int = 22) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    outputs = [torch.randn((2, 3, *s), generator=gen, dtype=torch.float64) for s in sizes]
    target = (torch.rand((2, 3, 8, 8, 8), generator=gen) < 0.3).double()
    return outputs, target


@pytest.mark.parametrize("weights", [None, (0.5, 0.3, 0.2)])
def test_deep_supervision_is_weighted_sum_of_scales(weights) -> None:
    outputs, target = ds_outputs()
    loss = L.FocalDiceLoss()
    total = L.DeepSupervisionLoss(loss, weights)(outputs, target)
    ws = weights or (2 / 3, 1 / 3, 0.0)
    # nearest-exact by a factor s samples source voxels s // 2, s // 2 + s, ...
    expected = sum(
        w * loss(o, target[..., s // 2 :: s, s // 2 :: s, s // 2 :: s])
        for s, w, o in zip((1, 2, 4), ws, outputs, strict=True)
    )
    torch.testing.assert_close(total, expected, atol=1e-12, rtol=0)
    # MONAI's wrapper with the same explicit weights also resizes with nearest-exact
    monai_total = ml.DeepSupervisionLoss(loss, weights=list(ws))(outputs, target)
    torch.testing.assert_close(total.float(), monai_total, atol=1e-6, rtol=0)


def test_deep_supervision_skips_zero_weights_and_passes_single_tensor() -> None:
    outputs, target = ds_outputs()
    seen: list[tuple[int, ...]] = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.shape == t.shape
        seen.append(tuple(x.shape[2:]))
        return L.soft_dice_loss(x, t)

    L.deep_supervision_loss(recording, outputs, target)
    assert seen == [(8, 8, 8), (4, 4, 4)]  # the lowest resolution has weight 0
    wrapper = L.DeepSupervisionLoss(L.SoftDiceLoss())
    torch.testing.assert_close(wrapper(outputs[0], target), L.soft_dice_loss(outputs[0], target))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda o, t: L.deep_supervision_loss(L.soft_dice_loss, [], t), "non-empty"),
        (lambda o, t: L.deep_supervision_loss(L.soft_dice_loss, o, t, (1.0, 1.0)), "3 outputs"),
        (lambda o, t: L.deep_supervision_loss(L.soft_dice_loss, o, t, (1, -1, 0)), ">= 0"),
        (lambda o, t: L.deep_supervision_loss(L.soft_dice_loss, o, t[:, :2]), "does not match"),
    ],
)
def test_deep_supervision_errors(call: Callable, match: str) -> None:
    outputs, target = ds_outputs()
    with pytest.raises(ValueError, match=match):
        call(outputs, target)


@pytest.mark.parametrize(
    ("cfg", "cls", "reference"),
    [
        (LossConfig(), L.FocalDiceLoss, lambda x, t: L.focal_dice_loss(x, t)),
        (LossConfig(name="focal_dice", gamma=1.0, alpha=0.3, lambda_focal=2.0, lambda_dice=0.5),
         L.FocalDiceLoss,
         lambda x, t: L.focal_dice_loss(x, t, gamma=1.0, alpha=0.3, lambda_focal=2.0,
                                        lambda_dice=0.5)),
        (LossConfig(name="dice_ce", activation="softmax", include_background=False,
                    batch_dice=True, lambda_focal=0.5),
         L.DiceCELoss,
         lambda x, t: L.dice_ce_loss(x, t, activation="softmax", include_background=False,
                                     batch_dice=True, lambda_ce=0.5)),
        (LossConfig(name="dice", smooth=1.0), L.SoftDiceLoss,
         lambda x, t: L.soft_dice_loss(x, t, smooth=1.0)),
        (LossConfig(name="focal", gamma=0.0, weight=(1.0, 2.0, 3.0)), L.FocalLoss,
         lambda x, t: F.binary_cross_entropy_with_logits(
             x, t, weight=torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype).view(1, 3, 1, 1, 1))),
    ],
)  # fmt: skip
def test_build_loss_presets(cfg: LossConfig, cls: type, reference: Callable) -> None:
    loss = L.build_loss(cfg)
    assert isinstance(loss, L.DeepSupervisionLoss) and isinstance(loss.loss, cls)
    x, t = make_pair((2, 3, 4, 4, 4), cfg.activation, seed=23)
    torch.testing.assert_close(loss(x, t), reference(x, t), atol=1e-12, rtol=0)


def test_build_loss_deep_supervision_weights() -> None:
    outputs, target = ds_outputs()
    loss = L.build_loss(LossConfig(name="dice", deep_supervision_weights=(0.2, 0.3, 0.5)))
    expected = sum(
        w * L.soft_dice_loss(o, L.downsample_target(target, o.shape[2:]))
        for w, o in zip((0.2, 0.3, 0.5), outputs, strict=True)
    )
    torch.testing.assert_close(loss(outputs, target), expected)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (LossConfig(name="tversky"), "unknown loss name 'tversky'; valid: focal_dice, dice_ce"),
        (LossConfig(activation="tanh"), "unknown activation 'tanh'; valid: sigmoid, softmax"),  # type: ignore[arg-type]
    ],
)
def test_build_loss_rejects_unknown_values(cfg: LossConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        L.build_loss(cfg)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

X3, T3 = make_pair((2, 3, 4, 4, 4), seed=24)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: L.focal_loss(X3, T3[:, :2]), "same shape"),
        (lambda: L.soft_dice_loss(X3, T3[..., :2]), "same shape"),
        (lambda: L.focal_loss(X3, T3, activation="relu"), "unknown activation 'relu'"),
        (lambda: L.focal_loss(X3, T3, reduction="max"), "unknown reduction 'max'"),
        (lambda: L.focal_loss(X3[:, :1], T3[:, :1], activation="softmax"), "C >= 2"),
        (lambda: L.focal_loss(X3, T3, weight=(1.0, 2.0)), "2 values but logits have 3"),
        (lambda: L.focal_loss(X3.long(), T3), "floating-point"),
        (lambda: L.focal_loss(X3[:0], T3[:0]), "empty"),
        (lambda: L.soft_dice_loss(X3[:, :, 0, 0, 0], T3[:, :, 0, 0, 0]), "at least 3 dims"),
        (lambda: L.FocalLoss(gamma=-1.0), "gamma must be >= 0"),
        (lambda: L.FocalLoss(alpha=1.5), "alpha must be in"),
        (lambda: L.FocalLoss(weight=(1.0, -2.0)), "weight must be"),
        (lambda: L.SoftDiceLoss(smooth=-1.0), "smooth must be >= 0"),
        (lambda: L.FocalDiceLoss(lambda_dice=-1.0), "lambdas"),
        (lambda: L.DiceCELoss(activation="softmax")(X3, T3[:, :2]), "same shape"),
    ],
)
def test_invalid_inputs_raise_clear_errors(call: Callable, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------- blob Dice


def _two_lesions() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x4x4 lesion the logits find and a one-voxel lesion they miss, in a 16^3 patch."""
    target = torch.zeros(1, 1, 16, 16, 16)
    target[0, 0, 2:6, 2:6, 2:6] = 1
    target[0, 0, 12, 12, 12] = 1
    logits = torch.full_like(target, -10.0)
    logits[0, 0, 2:6, 2:6, 2:6] = 10.0
    return logits, target


def test_blob_dice_scores_each_lesion_on_its_own() -> None:
    logits, target = _two_lesions()
    logits = logits + 0.3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    p = torch.sigmoid(logits)[0, 0]
    big = torch.zeros_like(target[0, 0], dtype=torch.bool)
    big[2:6, 2:6, 2:6] = True
    small = target[0, 0].bool() & ~big
    expected = []
    for lesion, other in ((big, small), (small, big)):
        masked = p * (~other)  # the other lesion masked out of the prediction
        dice = (2 * (masked * lesion).sum() + 1e-5) / (masked.sum() + lesion.sum() + 1e-5)
        expected.append(1 - dice)
    got = L.blob_dice_loss(logits, target)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_a_missed_small_lesion_costs_the_blob_term_half_while_dice_barely_moves() -> None:
    logits, target = _two_lesions()
    dice = L.soft_dice_loss(logits, target).item()
    blob = L.blob_dice_loss(logits, target).item()
    assert dice < 0.02 and blob == pytest.approx(0.5, abs=0.01)
    logits.requires_grad_(True)
    L.blob_dice_loss(logits, target).backward()
    assert logits.grad is not None and logits.grad[0, 0, 12, 12, 12] < 0  # pushes the miss up
    empty = torch.zeros_like(target)
    assert L.blob_dice_loss(logits, empty).item() == 0.0  # no lesions: nothing to add


def test_lambda_blob_adds_the_blob_term_to_the_configured_loss() -> None:
    logits, target = _two_lesions()
    base = L.build_loss(LossConfig())
    both = L.build_loss(LossConfig(lambda_blob=2.0))
    expected = base(logits, target) + 2.0 * L.blob_dice_loss(logits, target)
    assert both(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    deep = L.build_loss(LossConfig(lambda_blob=1.0))([logits, logits[:, :, ::2, ::2, ::2]], target)
    assert torch.isfinite(deep)  # deep supervision: each output against its downsampled target
