"""CPU benchmark: our U-Net blocks vs MONAI's DynUNet at equal topology, float32 vs bf16 autocast.

One training step (forward + backward of ``mean(logits)``) on a (B, C, S, S, S) float32 input,
default (2, 2, 64, 64, 64), 2 threads, nnU-Net's plain U-Net as ``ModelConfig`` spells it (depth
4, filters 16..128, two convs per level, instance norm, contiguous layout), which ``DynUNet``
can build too (the default config's one-conv levels and channels-last layout it cannot).
Variants run round-robin in a rotating order, so that load from other processes and allocator
state hit all of them alike. The table shows the median and minimum wall time and the median
process CPU time per variant, then the ratios.

    python scripts/bench_model.py [--size 64] [--batch 2] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from monai.networks.nets import DynUNet
from torch import nn

from segmenter.config import ModelConfig
from segmenter.nn.network import build_model, count_parameters


def dynunet_like(model: nn.Module, in_channels: int, out_channels: int) -> DynUNet:
    """MONAI's DynUNet with the same kernels, strides and filters as ``model.topology``."""
    topo = model.topology
    return DynUNet(
        3,
        in_channels,
        out_channels,
        kernel_size=list(topo.kernels),
        strides=list(topo.strides),
        upsample_kernel_size=list(topo.strides[1:]),
        filters=list(topo.filters),
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    )


def step_seconds(model: nn.Module, x: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """Wall and process CPU time of one forward + backward."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    out.float().mean().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ModelConfig(
        base_filters=16, encoder_convs=(2,), decoder_convs=(2,), memory_format="contiguous"
    )
    ours = build_model(cfg, args.channels, 1).train()
    nets = {"own": ours, "DynUNet": dynunet_like(ours, args.channels, 1).train()}
    x = torch.randn(args.batch, args.channels, args.size, args.size, args.size)
    variants = [(name, prec) for prec in ("fp32", "bf16") for name in nets]
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {v: [] for v in variants}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats + 1):  # the first round is warm-up
        for name, prec in variants[r % 4 :] + variants[: r % 4]:  # rotate the order
            runs[(name, prec)].append(step_seconds(nets[name], x, prec == "bf16"))
    load.append(os.getloadavg()[0])
    wall = {v: statistics.median(w for w, _ in r[1:]) for v, r in runs.items()}
    best = {v: min(w for w, _ in r[1:]) for v, r in runs.items()}
    cpu = {v: statistics.median(c for _, c in r[1:]) for v, r in runs.items()}

    print(
        f"fwd+bwd {tuple(x.shape)} float32 input, {args.threads} threads, depth {cfg.depth}, "
        f"filters {list(ours.topology.filters)}, instance norm, {count_parameters(ours)} params "
        f"(DynUNet {count_parameters(nets['DynUNet'])}); {args.repeats} interleaved repeats; "
        f"load avg {load[0]:.2f} -> {load[1]:.2f}"
    )
    print(f"{'variant':<13} {'median s':>9} {'min s':>7} {'cpu s':>7}")
    for v in variants:
        print(f"{v[0] + ' ' + v[1]:<13} {wall[v]:>9.3f} {best[v]:>7.3f} {cpu[v]:>7.3f}")
    for prec in ("fp32", "bf16"):
        o, d = ("own", prec), ("DynUNet", prec)
        print(
            f"own/DynUNet {prec}: {wall[o] / wall[d]:.2f} median, {best[o] / best[d]:.2f} min, "
            f"{cpu[o] / cpu[d]:.2f} cpu  (< 1: own faster)"
        )
    for name in nets:
        f, b = (name, "fp32"), (name, "bf16")
        print(
            f"{name} fp32/bf16: {wall[f] / wall[b]:.2f} median, {best[f] / best[b]:.2f} min, "
            f"{cpu[f] / cpu[b]:.2f} cpu  (> 1: bf16 autocast faster)"
        )


if __name__ == "__main__":
    main()
