"""3D U-Net (nnU-Net topology) built from a typed :class:`~segmenter.config.ModelConfig`.

The network follows nnU-Net's plain U-Net (Isensee et al. 2021, "nnU-Net: a self-configuring
method for deep learning-based biomedical image segmentation", Nat. Methods 18:203): per
resolution level ``conv -> norm -> LeakyReLU(0.01)`` layers (the first one strided from the
second level on), transposed-convolution upsampling, concatenated skips, 1x1x1 output heads,
Kaiming-normal initialisation (negative slope 1e-2). ``residual=True`` swaps the encoder's
blocks for residual ones (the level's convs plus a 1x1x1 projection shortcut when the shape
changes), as MONAI's ``DynUNet(res_block=True)`` does.

Convs per level: nnU-Net's plain U-Net has two everywhere (``encoder_convs=[2]``,
``decoder_convs=[2]``; ``tests/nn/test_network.py`` checks it against ``DynUNet``). The default is
lighter at full resolution, where a 64^3 patch spends most of a step: one conv at level 0 of
the encoder and one per decoder level (nnU-Net's residual-encoder presets also use one block in
their first stage and one conv per decoder stage). ``python scripts/bench_train.py`` times the
default against MONAI's ``UNet`` (README, Speed: 0.177 vs 0.229 s per (2, 2, 64^3) bf16 step on
2 EPYC cores; nnU-Net's plain layout at 16 filters ran 0.35x MONAI's voxel throughput there).

Own blocks, not MONAI's ``DynUNet``: at equal topology both are as fast (``scripts/bench_model.py``)
and give the same logits (``tests/nn/test_network.py``); only ours give deep-supervision outputs at
native resolution, depth 2, any input size and nnU-Net v2's decoder kernels for anisotropic data.

Kernels and strides per level come from :mod:`segmenter.planning.topology` (nnU-Net's
anisotropy rule for thick-slice data).

Any input size works: the model zero-pads the end of each spatial axis up to a multiple of
:func:`required_divisor` (only when needed) and crops the logits back, so sliding-window
inference and odd-sized volumes need no padding by the caller. Inputs already divisible (the
usual training patches, e.g. 64^3, 96^3) run without any padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segmenter.config import ModelConfig
from segmenter.planning.topology import Topology, Triple, plan_topology

#: Negative slope of the LeakyReLU activations and of the Kaiming initialisation (nnU-Net).
NEGATIVE_SLOPE = 1e-2
#: Upper bound on the number of groups of ``norm="group"``.
MAX_GROUPS = 8


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}; expected 'instance', 'batch' or 'group'")


def _conv(in_ch: int, out_ch: int, kernel: Triple, stride: Triple) -> nn.Conv3d:
    # No bias: every convolution is followed by a normalisation layer that removes it.
    padding = tuple(k // 2 for k in kernel)
    return nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)


class ConvNormAct(nn.Module):
    """``conv -> [dropout] -> norm -> [LeakyReLU(0.01)]``; (B, C_in, X, Y, Z) -> (B, C_out, ...).

    Attributes:
        conv: the convolution (no bias: the norm removes it).
        drop: dropout, or identity when the probability is 0.
        norm: the normalisation layer.
        act: in-place LeakyReLU, or identity when built with ``act=False``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Triple,
        stride: Triple,
        norm: str,
        dropout: float,
        *,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = _conv(in_ch, out_ch, kernel, stride)
        self.drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm = _norm(norm, out_ch)
        self.act: nn.Module = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.drop(self.conv(x))))


def _conv_layers(
    in_ch: int,
    out_ch: int,
    kernel: Triple,
    stride: Triple,
    norm: str,
    dropout: float,
    n_convs: int,
    *,
    last_act: bool = True,
) -> list[ConvNormAct]:
    """``n_convs`` :class:`ConvNormAct`; the first carries the stride, the last ``last_act``."""
    return [
        ConvNormAct(
            in_ch if i == 0 else out_ch,
            out_ch,
            kernel,
            stride if i == 0 else (1, 1, 1),
            norm,
            dropout,
            act=last_act or i < n_convs - 1,
        )
        for i in range(n_convs)
    ]


class ConvBlock(nn.Module):
    """``n_convs`` :class:`ConvNormAct` named ``conv1``, ``conv2``...; ``conv1`` is strided."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Triple,
        stride: Triple,
        norm: str,
        dropout: float,
        n_convs: int = 2,
    ) -> None:
        super().__init__()
        for i, layer in enumerate(
            _conv_layers(in_ch, out_ch, kernel, stride, norm, dropout, n_convs)
        ):
            self.add_module(f"conv{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class ResidualBlock(nn.Module):
    """``act(convs(x) + shortcut(x))`` (He et al. 2016), the last conv without activation.

    ``conv1`` carries the level's stride (``conv1``, ``conv2``... as :class:`ConvBlock`). The
    shortcut is the identity, or ``1x1x1 strided conv -> norm`` when the channels or the
    resolution change.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Triple,
        stride: Triple,
        norm: str,
        dropout: float,
        n_convs: int = 2,
    ) -> None:
        super().__init__()
        layers = _conv_layers(in_ch, out_ch, kernel, stride, norm, dropout, n_convs, last_act=False)
        self.n_convs = n_convs
        for i, layer in enumerate(layers):
            self.add_module(f"conv{i + 1}", layer)
        self.shortcut: nn.Module = nn.Identity()
        if in_ch != out_ch or stride != (1, 1, 1):
            self.shortcut = ConvNormAct(in_ch, out_ch, (1, 1, 1), stride, norm, dropout, act=False)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(self.n_convs):
            h = getattr(self, f"conv{i + 1}")(h)
        return self.act(h + self.shortcut(x))


class UpBlock(nn.Module):
    """Transposed-conv upsampling by ``stride``, concatenation with the skip, :class:`ConvBlock`.

    ``(B, C_in, *s) , skip (B, C_out, *(s * stride)) -> (B, C_out, *(s * stride))``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Triple,
        stride: Triple,
        norm: str,
        dropout: float,
        n_convs: int = 2,
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_ch, out_ch, stride, stride=stride, bias=False)
        self.conv = ConvBlock(2 * out_ch, out_ch, kernel, (1, 1, 1), norm, dropout, n_convs)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat((self.up(x), skip), dim=1))


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class UNet3d(nn.Module):
    """nnU-Net-style 3D U-Net returning logits; see :func:`build_model`.

    Attributes:
        in_channels: input channels (MRI sequences).
        out_channels: output channels (classes, activation not applied).
        topology: kernels, strides and filters per level.
        deep_supervision: whether training-mode forward returns one output per decoder level.
        encoder: ``depth`` blocks, level 0 first (the last one is the bottleneck).
        decoder: ``depth - 1`` :class:`UpBlock`; ``decoder[l]`` goes from level ``l + 1`` to ``l``.
        heads: 1x1x1 output convolutions; ``heads[l]`` reads decoder level ``l``. One head
            without deep supervision, ``depth - 1`` with it.
        memory_format: ``auto`` (channels-last on the CPU), ``channels_last`` or
            ``contiguous``: the layout ``forward`` gives its input (the activations follow it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        topology: Topology,
        *,
        norm: str = "instance",
        residual: bool = False,
        deep_supervision: bool = False,
        dropout: float = 0.0,
        memory_format: str = "auto",
    ) -> None:
        super().__init__()
        if memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"unknown memory_format {memory_format!r}")
        self.memory_format = memory_format
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.topology = topology
        self.deep_supervision = deep_supervision
        f, k, s = topology.filters, topology.kernels, topology.strides
        enc, dec = topology.encoder_convs, topology.decoder_convs
        block = ResidualBlock if residual else ConvBlock
        self.encoder = nn.ModuleList(
            block(
                in_channels if lv == 0 else f[lv - 1], f[lv], k[lv], s[lv], norm, dropout, enc[lv]
            )
            for lv in range(topology.depth)
        )
        self.decoder = nn.ModuleList(
            UpBlock(f[lv + 1], f[lv], k[lv], s[lv + 1], norm, dropout, dec[lv])
            for lv in range(topology.depth - 1)
        )
        n_heads = topology.depth - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(f[lv], out_channels, 1) for lv in range(n_heads))
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Logits of ``x``.

        Each spatial axis is zero-padded at its end to a multiple of ``topology.divisor`` when
        it is not one already, and the logits are cropped back (views, no copy).

        Args:
            x: (B, in_channels, X, Y, Z) float, any spatial size.

        Returns:
            Logits, not activated: float32 for float32 input, bfloat16 under bf16 autocast.
            Eval mode, or without deep supervision: one (B, out_channels, X, Y, Z) tensor.
            Train mode with deep supervision: a list of ``depth - 1`` logits tensors, highest
            resolution first; entry ``l`` has shape
            (B, out_channels, ceil(X / sx), ceil(Y / sy), ceil(Z / sz)) with
            ``(sx, sy, sz) = topology.scale(l)`` (entry 0 is the full-resolution output).

        Raises:
            ValueError: ``x`` is not 5-D or has the wrong number of channels.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, X, Y, Z), got shape {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        div = self.topology.divisor
        pad = [-n % d for n, d in zip(size, div, strict=True)]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        if self.channels_last(x.device):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips: list[Tensor] = []
        h = x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        supervise = self.deep_supervision and self.training
        outputs: list[Tensor] = []
        for level in range(len(self.decoder) - 1, -1, -1):
            h = self.decoder[level](h, skips[level])
            if supervise or level == 0:
                outputs.append(_crop(self.heads[level](h), size, self.topology.scale(level)))
        if supervise:
            return outputs[::-1]
        return outputs[-1]

    def place(self, device: torch.device) -> UNet3d:
        """Move to ``device`` with the weights in the layout :meth:`channels_last` picks there.

        ``forward`` converts its input either way; channels-last weights as well are what
        makes oneDNN run the whole step in that layout (with the input alone, timings of the
        default step matched the contiguous layout).
        """
        fmt = torch.channels_last_3d if self.channels_last(device) else torch.contiguous_format
        return self.to(device=device, memory_format=fmt)

    def channels_last(self, device: torch.device) -> bool:
        """Whether activations on ``device`` run in 3D channels-last layout."""
        if self.memory_format == "auto":
            return device.type == "cpu"
        return self.memory_format == "channels_last"


def _crop(t: Tensor, size: Sequence[int], scale: Triple) -> Tensor:
    """Crop padded logits to ``ceil(size / scale)`` per axis (a no-op view when unpadded)."""
    x, y, z = (math.ceil(n / s) for n, s in zip(size, scale, strict=True))
    if tuple(t.shape[2:]) == (x, y, z):
        return t
    return t[:, :, :x, :y, :z]


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal weights (negative slope 1e-2) and zero biases, as nnU-Net."""
    if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_channels(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_model(
    cfg: ModelConfig,
    in_channels: int,
    out_channels: int,
    *,
    spacing: tuple[float, float, float] | None = None,
    patch_size: tuple[int, int, int] | None = None,
) -> UNet3d:
    """Build the 3D U-Net described by ``cfg``.

    Args:
        cfg: depth, filters, norm, residual blocks, deep supervision, dropout.
        in_channels: input channels (number of MRI sequences), >= 1.
        out_channels: logits channels, >= 1 (one per foreground class with sigmoid, classes
            including background with softmax).
        spacing: voxel spacing (X, Y, Z) in mm of the training data, or None (isotropic
            strides 2 and kernels 3). Anisotropic spacing gives nnU-Net-style per-axis kernels
            and strides (see the module docstring and :func:`plan_topology`).
        patch_size: training patch (X, Y, Z), or None; limits downsampling of short axes.

    Returns:
        A :class:`UNet3d` in training mode. Called on (B, in_channels, X, Y, Z) float input of
        any size, it returns (B, out_channels, X, Y, Z) float logits in eval mode (or always,
        without deep supervision); in train mode with ``cfg.deep_supervision`` a list of
        ``cfg.depth - 1`` logits tensors, highest resolution first, each at its native
        resolution: entry ``l`` is (B, out_channels, *ceil(size / topology.scale(l))).

    Raises:
        ValueError: a channel count is not a positive integer, or bad spacing / patch size.
    """
    _check_channels("in_channels", in_channels)
    _check_channels("out_channels", out_channels)
    topology = plan_topology(cfg, spacing=spacing, patch_size=patch_size)
    return UNet3d(
        in_channels,
        out_channels,
        topology,
        norm=cfg.norm,
        residual=cfg.residual,
        deep_supervision=cfg.deep_supervision,
        dropout=cfg.dropout,
        memory_format=cfg.memory_format,
    )


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameter values of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
