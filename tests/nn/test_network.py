"""Tests for segmenter.nn.network: shapes, deep supervision, anisotropy, gradients, determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from monai.networks.nets import DynUNet
from torch import nn

from segmenter.config import ConfigError, ModelConfig
from segmenter.nn.network import ResidualBlock, build_model, count_parameters

#: A small network for these tests; ``replace(TINY, ...)`` varies one setting.
TINY = ModelConfig(depth=4, base_filters=4, max_filters=16)


@pytest.mark.parametrize(
    "size", [(32, 32, 32), (16, 32, 8), (40, 56, 24), (37, 45, 29), (9, 17, 5)]
)
def test_output_shape_equals_input_shape(size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, 2, 3)
    x = torch.randn(2, 2, *size)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    model.train()
    y_train = model(x)
    for y in (y_eval, y_train):
        assert isinstance(y, torch.Tensor)
        assert y.shape == (2, 3, *size)
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()


def test_odd_sizes_are_zero_padded_at_the_end_and_cropped_back() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, 1, 1).eval()
    x = torch.randn(1, 1, 37, 45, 29)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3, 0, 3))  # up to 40, 48, 32 (divisor 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[:, :, :37, :45, :29])


@pytest.mark.parametrize(("c_in", "c_out"), [(1, 1), (4, 2), (3, 5)])
def test_channels_in_and_out(c_in: int, c_out: int) -> None:
    model = build_model(replace(TINY, depth=3), c_in, c_out).eval()
    with torch.no_grad():
        y = model(torch.randn(1, c_in, 16, 12, 20))
    assert y.shape == (1, c_out, 16, 12, 20)


@pytest.mark.parametrize("residual", [False, True])
def test_blocks_hold_the_configured_number_of_convs(residual: bool) -> None:
    cfg = replace(TINY, encoder_convs=(1, 3), decoder_convs=(2, 1), residual=residual)
    model = build_model(cfg, 2, 1)

    def convs(block: nn.Module) -> int:
        return sum(1 for name, _ in block.named_children() if name.startswith("conv"))

    assert [convs(b) for b in model.encoder] == [1, 3, 3, 3]
    assert [convs(d.conv) for d in model.decoder] == [2, 1, 1]
    x = torch.randn(2, 2, 16, 24, 8)
    out = model(x)
    assert out.shape == (2, 1, 16, 24, 8)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("key", ["encoder_convs", "decoder_convs"])
@pytest.mark.parametrize("value", [(), (1, 0)])
def test_conv_counts_must_be_positive(key: str, value: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=key):
        replace(TINY, **{key: value})


@pytest.mark.parametrize("size", [(32, 32, 32), (37, 45, 29)])
def test_deep_supervision_outputs_in_train_mode_and_single_tensor_in_eval(
    size: tuple[int, int, int],
) -> None:
    torch.manual_seed(0)
    model = build_model(replace(TINY, deep_supervision=True), 1, 2)
    x = torch.randn(2, 1, *size)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == TINY.depth - 1
    for level, out in enumerate(outs):
        expected = tuple(-(-n // 2**level) for n in size)  # ceil(n / 2**level)
        assert out.shape == (2, 2, *expected)
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2, *size)
    # Instance norm has no running statistics: eval output == full-resolution training output.
    torch.testing.assert_close(y, outs[0].detach())


def test_deep_supervision_with_depth_two_returns_one_output() -> None:
    model = build_model(replace(TINY, depth=2, deep_supervision=True), 1, 1).train()
    outs = model(torch.randn(1, 1, 8, 8, 8))
    assert isinstance(outs, list) and len(outs) == 1 and outs[0].shape == (1, 1, 8, 8, 8)


def test_residual_option_uses_residual_blocks() -> None:
    plain = build_model(TINY, 2, 1)
    res = build_model(replace(TINY, residual=True), 2, 1)
    assert not any(isinstance(m, ResidualBlock) for m in plain.modules())
    assert sum(isinstance(m, ResidualBlock) for m in res.modules()) == TINY.depth
    assert count_parameters(res) > count_parameters(plain)  # 1x1x1 projection shortcuts
    with torch.no_grad():
        y = res.eval()(torch.randn(1, 2, 24, 20, 16))
    assert y.shape == (1, 1, 24, 20, 16)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_other_norms(norm: str) -> None:
    model = build_model(replace(TINY, norm=norm, base_filters=6), 1, 1).train()
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 1, 16, 16, 16)


def test_anisotropic_model_has_those_kernels_and_keeps_shape() -> None:
    cfg = replace(TINY, depth=3)
    model = build_model(cfg, 1, 1, spacing=(0.5, 0.5, 3.0), patch_size=(32, 32, 8))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv3d))
    assert tuple(first_conv.kernel_size) == (3, 3, 1)
    assert model.topology.divisor == (4, 4, 1)
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 1, 30, 34, 7))
    assert y.shape == (1, 1, 30, 34, 7)


def _dynunet_like(model: nn.Module, residual: bool) -> DynUNet:
    topo = model.topology
    return DynUNet(
        3,
        model.in_channels,
        model.out_channels,
        kernel_size=list(topo.kernels),
        strides=list(topo.strides),
        upsample_kernel_size=list(topo.strides[1:]),
        filters=list(topo.filters),
        res_block=residual,
    )


def _dynunet_key(key: str, depth: int) -> str:
    """Name in MONAI's DynUNet of one of our state-dict entries (same topology)."""
    part = key.split(".")
    unit = {"conv1": "1", "conv2": "2", "shortcut": "3"}
    if part[0] == "heads":
        return f"output_block.conv.conv.{part[-1]}"
    if part[0] == "encoder":
        level = int(part[1])
        block = (
            "input_block"
            if level == 0
            else "bottleneck"
            if level == depth - 1
            else f"downsamples.{level - 1}"
        )
        sub = part[2:]
    else:  # decoder.<level>.up | decoder.<level>.conv.<conv1|conv2>...
        block = f"upsamples.{depth - 2 - int(part[1])}"
        if part[2] == "up":
            return f"{block}.transp_conv.conv.weight"
        block += ".conv_block"
        sub = part[3:]
    i = unit[sub[0]]
    return f"{block}.conv{i}.conv.weight" if sub[1] == "conv" else f"{block}.norm{i}.{sub[2]}"


@pytest.mark.parametrize("residual", [False, True])
def test_matches_monai_dynunet_with_the_same_weights(residual: bool) -> None:
    # Oracle: same parameters and, loaded with DynUNet's weights, the same logits.
    torch.manual_seed(0)
    plain = {"encoder_convs": (2,), "decoder_convs": (2,)}  # nnU-Net's plain U-Net
    for cfg in (
        ModelConfig(residual=residual, base_filters=16, **plain),  # type: ignore[arg-type]
        replace(TINY, residual=residual, depth=3, **plain),
    ):
        model = build_model(cfg, 2, 1)
        oracle = _dynunet_like(model, residual)
        assert count_parameters(model) == count_parameters(oracle)
    theirs = oracle.state_dict()
    model.load_state_dict({k: theirs[_dynunet_key(k, cfg.depth)] for k in model.state_dict()})
    x = torch.randn(2, 2, 16, 24, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), oracle.eval()(x))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model(replace(TINY, residual=True, deep_supervision=True), 2, 2).train()
    outs = model(torch.randn(2, 2, 20, 18, 12))
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_initialisation_is_kaiming_with_zero_bias() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 2, 1)
    conv = model.encoder[2].conv1.conv  # level 2, first conv: 16 -> 32 channels, 3x3x3
    assert isinstance(conv, nn.Conv3d) and conv.bias is None
    fan_in = 16 * 27
    expected_std = (2.0 / (1 + 0.01**2) / fan_in) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    for head in model.heads:
        assert torch.count_nonzero(head.bias) == 0


def test_same_seed_gives_identical_weights_and_outputs() -> None:
    x = torch.randn(1, 2, 24, 24, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(replace(TINY, dropout=0.1), 2, 1).train()
        torch.manual_seed(7)
        results.append((model.state_dict(), model(x)))
    (sd_a, y_a), (sd_b, y_b) = results
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0, atol=0)
    torch.testing.assert_close(y_a, y_b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("c_in", "c_out", "match"),
    [
        (0, 1, "in_channels must be a positive integer, got 0"),
        (2, -1, "out_channels must be a positive integer, got -1"),
        (2.0, 1, "in_channels must be a positive integer, got 2.0"),
        (1, True, "out_channels must be a positive integer, got True"),
    ],
)
def test_invalid_channel_count_raises(c_in: object, c_out: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(TINY, c_in, c_out)  # type: ignore[arg-type]


def test_invalid_input_spacing_or_patch_raises() -> None:
    model = build_model(TINY, 2, 1)
    with pytest.raises(ValueError, match=r"expected input \(B, 2, X, Y, Z\), got shape"):
        model(torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="spacing must be three positive finite numbers"):
        build_model(TINY, 2, 1, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="patch_size must be three positive integers"):
        build_model(TINY, 2, 1, patch_size=(64, 64))  # type: ignore[arg-type]
