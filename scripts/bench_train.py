"""Benchmark: our training step and inference against a plain MONAI pipeline, same run, same CPU.

Measures, in one process and with the same torch threads:

1. the matmul reference: GFLOP/s of a square float32 and bfloat16 matmul on this CPU;
2. training throughput on one random (B, 2, P, P, P) batch, P the default config's patch:
   ours (default ``build_model`` + ``build_loss`` + the training loop's optimizer and step,
   autocast dtype as training picks it) against MONAI's ``UNet(16..256, num_res_units=2)`` +
   ``DiceFocalLoss(sigmoid=True)`` + Adam in float32, as the MONAI tutorials write it. Median
   step time after warm-up, variants interleaved in alternating order; voxels/s; FLOPs per
   step (forward + backward, ``torch.utils.flop_counter``) -> achieved GFLOP/s and % of the
   matmul peak of the dtype the convolutions run in;
3. inference seconds for one (2, X, Y, Z) volume (default 182x218x182): ``predict_logits`` with
   the default InferenceConfig, without and with mirroring TTA, against MONAI's
   ``sliding_window_inference`` (same window, overlap, Gaussian weights, windows per batch) and a
   plain 8-mirror TTA loop;
4. the data-loader wait: ``loop.fit`` on a small phantom dataset in a temporary folder, and the
   fraction of the training time the step waited for a batch.

``loop.tune_allocator()`` (process-wide) is called first, so both pipelines get it. Prints a
table with the ratios ours/MONAI and the load average around each part (other processes on the
same cores slow both sides alike, since they are interleaved). Always exits 0.

    python scripts/bench_train.py [--quick] [--steps 8] [--volume 182 218 182]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceFocalLoss
from monai.networks.nets import UNet
from torch.utils.flop_counter import FlopCounterMode

from segmenter.config import Config, load_config
from segmenter.data.synthetic import PhantomSpec, write_dataset
from segmenter.inference.sliding_window import predict_logits
from segmenter.nn.losses import build_loss
from segmenter.nn.network import build_model, count_parameters
from segmenter.nn.runtime import autocast_dtype
from segmenter.training import loop
from segmenter.training.schedule import build_optimizer

CPU = torch.device("cpu")


def load() -> float:
    """1-minute load average."""
    return os.getloadavg()[0]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` (median of ``repeats``)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def monai_unet() -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=1,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


def training_steps(
    cfg: Config, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, Callable[[], None]], dict[str, torch.nn.Module]]:
    """One optimiser step per call for each pipeline, on the same batch; and the two models."""
    dtype = autocast_dtype(cfg.train.precision, CPU)
    torch.manual_seed(0)
    ours = build_model(cfg.model, x.shape[1], 1).place(CPU).train()
    step = loop.TrainStep(  # the training loop's own step (AdamW, autocast, grad clipping)
        cfg=cfg, model=ours, loss_fn=build_loss(cfg.loss),
        optimizer=build_optimizer(cfg.train, ours), device=CPU, dtype=dtype,
    )  # fmt: skip
    batch = {"image": x, "label": y}

    def ours_step() -> None:
        step(batch)

    ref = monai_unet().train()
    ref_loss = DiceFocalLoss(sigmoid=True)
    ref_opt = torch.optim.Adam(ref.parameters(), 1e-4)

    def monai_step() -> None:  # MONAI tutorial loop
        ref_opt.zero_grad()
        loss = ref_loss(ref(x), y)
        loss.backward()
        ref_opt.step()

    return {"ours": ours_step, "monai": monai_step}, {"ours": ours, "monai": ref}


def step_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call, variants called in alternating order each round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


MIRRORS = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]


def monai_predict(
    model: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], sw: int, tta: bool
):
    """Plain MONAI sliding window (Gaussian, overlap 0.5), optionally averaged over 8 mirrors."""
    total = None
    with torch.no_grad():
        for axes in MIRRORS if tta else [()]:
            xi = torch.flip(x, axes) if axes else x
            out = sliding_window_inference(xi, roi, sw, model, overlap=0.5, mode="gaussian")
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
    return total / (len(MIRRORS) if tta else 1)


def inference_seconds(
    cfg: Config, shape: tuple[int, int, int], patch: tuple[int, int, int], tta: bool
) -> dict[str, float]:
    """Seconds per volume of each pipeline (one interleaved run after a one-window warm-up)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, *shape, generator=gen)
    dtype = autocast_dtype(cfg.train.precision, CPU)
    ours = build_model(cfg.model, 2, 1).place(CPU).eval()
    ref = monai_unet().eval()
    sw = cfg.inference.sw_batch_size

    def runs(v: torch.Tensor) -> dict[str, Callable[[], object]]:
        image = v[0].numpy()
        return {
            "ours": lambda: predict_logits(
                ours, image, patch, cfg.inference, device=CPU, dtype=dtype, tta=tta
            ),
            "monai": lambda: monai_predict(ref, v, patch, sw, tta),
        }

    for fn in runs(x[..., : patch[0], : patch[1], : patch[2]]).values():  # warm-up
        fn()
    return interleaved_medians(runs(x), 1)


def data_wait(cases: int, size: int, epochs: int, iters: int, tmp: Path) -> dict[str, float]:
    """``loop.fit`` on a phantom dataset; wait fraction, steps/s, per-epoch wait from metrics."""
    root = write_dataset(tmp / "data", cases, seed=0, spec=PhantomSpec(size=size))
    cfg = load_config(
        None,
        [
            f"data.dataset={root}",
            f"train.epochs={epochs}",
            f"train.iterations_per_epoch={iters}",
            "train.val_every=100",
            "train.n_folds=4",
        ],
    )
    result = loop.fit(cfg, tmp / "run", progress=False)
    with open(tmp / "run" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_s = sum(float(r["epoch_s"]) for r in rows)
    return {
        "wait_fraction": result.data_wait_fraction,
        "steps": result.steps,
        "steps_per_s": result.steps / train_s,
        "train_s": train_s,
        "total_s": result.seconds,
        "epoch_wait": [float(r["data_wait_s"]) for r in rows],
        "epoch_s": [float(r["epoch_s"]) for r in rows],
        "workers": cfg.data.num_workers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--patch", type=int, default=None, help="default: the config's patch")
    parser.add_argument("--matmul", type=int, default=2048, help="matmul size n")
    parser.add_argument("--volume", type=int, nargs=3, default=[182, 218, 182])
    parser.add_argument(
        "--tta-volume", type=int, nargs=3, default=None, help="volume of the TTA run (--volume)"
    )
    parser.add_argument("--no-tta", action="store_true", help="skip the TTA inference timing")
    parser.add_argument("--fit-cases", type=int, default=8)
    parser.add_argument("--fit-size", type=int, default=64)
    parser.add_argument("--fit-epochs", type=int, default=2)
    parser.add_argument("--fit-iters", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.matmul = 2, 1, 512
        args.patch = args.patch or 32
        args.volume, args.tta_volume = [32, 40, 32], [32, 32, 32]
        args.fit_cases, args.fit_size, args.fit_epochs, args.fit_iters = 4, 32, 1, 2

    torch.set_num_threads(args.threads)
    allocator = loop.tune_allocator()  # process-wide: applies to both pipelines
    cfg = Config()
    if args.patch:
        cfg = load_config(None, [f"data.patch_size=[{args.patch}, {args.patch}, {args.patch}]"])
    patch = tuple(cfg.data.patch_size)
    bsz = cfg.data.batch_size
    dtype = autocast_dtype(cfg.train.precision, CPU)
    loads = {"start": load()}
    started = time.perf_counter()

    # 1. matmul reference
    peak = {
        "fp32": matmul_gflops(args.matmul, torch.float32, 5),
        "bf16": matmul_gflops(args.matmul, torch.bfloat16, 5),
    }
    loads["matmul"] = load()

    # 2. training throughput
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, 2, *patch, generator=gen)
    y = (torch.rand(bsz, 1, *patch, generator=gen) < 0.01).float()
    steps, models = training_steps(cfg, x, y)
    flops = {n: step_flops(fn) for n, fn in steps.items()}  # also a warm-up step
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    step_s = interleaved_medians(steps, args.steps)
    loads["train"] = load()
    params = {n: count_parameters(m) for n, m in models.items()}
    del steps, models
    voxels = bsz * int(np.prod(patch))

    # 3. inference
    volume = tuple(args.volume)
    infer = {"no TTA": inference_seconds(cfg, volume, patch, tta=False)}
    loads["infer"] = load()
    tta_volume = tuple(args.tta_volume or args.volume)
    if not args.no_tta:
        infer["TTA x8"] = inference_seconds(cfg, tta_volume, patch, tta=True)
        loads["tta"] = load()

    # 4. data-loader wait in the real training loop
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        fit = data_wait(args.fit_cases, args.fit_size, args.fit_epochs, args.fit_iters, Path(tmp))
    loads["fit"] = load()

    # report
    conv_dtype = {"ours": "bf16" if dtype == torch.bfloat16 else "fp32", "monai": "fp32"}
    print(
        f"bench_train: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; tune_allocator() applied to both pipelines: {allocator}"
    )
    print(
        f"command: python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}"
    )
    print("load average (1 min): " + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()))
    print(
        f"matmul {args.matmul}^2: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s"
    )
    print(
        f"training: batch ({bsz}, 2, {patch[0]}, {patch[1]}, {patch[2]}), median of {args.steps} "
        f"interleaved steps after {args.warmup + 1} warm-up; ours = default model + "
        f"{cfg.loss.name} + {cfg.train.optimizer}, autocast {conv_dtype['ours']}; "
        f"MONAI = UNet(16..256, res 2) + DiceFocalLoss + Adam, fp32"
    )
    print(
        f"{'training':<10}{'params':>10}{'s/step':>9}{'Mvox/s':>9}{'GFLOP/step':>12}"
        f"{'GFLOP/s':>9}{'% peak':>12}"
    )
    for n in ("ours", "monai"):
        gf = flops[n] / 1e9
        pct = 100 * gf / step_s[n] / peak[conv_dtype[n]]
        print(
            f"{n:<10}{params[n]:>10,}{step_s[n]:>9.3f}{voxels / step_s[n] / 1e6:>9.3f}{gf:>12.1f}"
            f"{gf / step_s[n]:>9.1f}{pct:>7.1f} {conv_dtype[n]}"
        )
    vox_ratio = step_s["monai"] / step_s["ours"]
    print(
        f"ratio ours/MONAI voxels/s: {vox_ratio:.2f} (>= 1 required: "
        f"{'met' if vox_ratio >= 1 else 'NOT met'})"
    )
    print(
        f"inference: {volume[0]}x{volume[1]}x{volume[2]} x2 channels (TTA run: "
        f"{tta_volume[0]}x{tta_volume[1]}x{tta_volume[2]}), window {patch[0]}^3, overlap "
        f"{cfg.inference.overlap}, gaussian, {cfg.inference.sw_batch_size} windows/batch; "
        f"ours autocast {conv_dtype['ours']}, MONAI fp32"
    )
    print(f"{'inference':<10}{'ours s':>9}{'MONAI s':>9}{'ours/MONAI speed':>18}")
    for k, v in infer.items():
        print(f"{k:<10}{v['ours']:>9.2f}{v['monai']:>9.2f}{v['monai'] / v['ours']:>18.2f}")
    waits = ", ".join(
        f"{w:.2f}/{e:.1f}" for w, e in zip(fit["epoch_wait"], fit["epoch_s"], strict=True)
    )
    print(
        f"data loader: fit on {args.fit_cases} phantom cases of {args.fit_size}^3, "
        f"{fit['steps']} steps, {fit['workers']} workers: the step waited for data "
        f"{100 * fit['wait_fraction']:.1f}% of the training time (per epoch wait/epoch s: "
        f"{waits}); {fit['steps_per_s']:.2f} steps/s in the loop "
        f"(bench step: {1 / step_s['ours']:.2f} steps/s); fit total {fit['total_s']:.1f} s"
    )
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
