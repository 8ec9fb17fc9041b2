"""Benchmark: segmenter's FocalDiceLoss against MONAI's DiceFocalLoss (sigmoid), same run.

Times forward+backward (median of several repeats, variants interleaved in one process) and
measures the peak memory each variant adds on top of its inputs, each in a fresh subprocess:
glibc is told to mmap every large block (``MALLOC_MMAP_THRESHOLD_``) so resident memory follows
live tensors, the kernel's peak-RSS counter is reset after the inputs exist and a small warm-up
(``/proc/self/clear_refs``; ``ru_maxrss`` minus the same baseline where that is unavailable),
and the peak after one forward+backward is read back. Prints a table and the ratios ours/MONAI;
exits 1 if ours is slower or uses more memory.

    python scripts/bench_loss.py [--repeats 9] [--memory-runs 3] [--shape 2 1 128 128 128]

Works from a checkout (the repository root is put on ``sys.path`` when the package is not
installed).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("segmenter", "monai")


def make_loss(variant: str) -> torch.nn.Module:
    if variant == "segmenter":
        from segmenter.nn.losses import FocalDiceLoss

        return FocalDiceLoss(activation="sigmoid", gamma=2.0, smooth=1e-5)
    from monai.losses import DiceFocalLoss

    return DiceFocalLoss(sigmoid=True, gamma=2.0, smooth_nr=1e-5, smooth_dr=1e-5)


def make_inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen) * 3.0).requires_grad_()
    target = (torch.rand(shape, generator=gen) < 0.01).float()  # sparse lesions
    return logits, target


def step(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor) -> float:
    logits.grad = None
    value = loss(logits, target)
    value.backward()
    return value.item()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_memory(variant: str, shape: tuple[int, ...]) -> float:
    """Peak MiB added by one forward+backward; run in a fresh process."""
    import monai.losses  # noqa: F401  (both variants carry the same imports)

    import segmenter.nn.losses  # noqa: F401

    loss = make_loss(variant)
    step(loss, *make_inputs((2, 1, 8, 8, 8)))  # lazy initialisation outside the measurement
    logits, target = make_inputs(shape)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        base, peak_of = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    step(loss, logits, target)
    return (peak_of() - base) / 1024


def memory_in_subprocess(variant: str, shape: tuple[int, ...]) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-of", variant, "--shape", *map(str, shape)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def time_variants(shape: tuple[int, ...], repeats: int) -> tuple[dict, dict]:
    logits, target = make_inputs(shape)
    losses = {v: make_loss(v) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    values = {v: step(losses[v], logits, target) for v in VARIANTS}  # warm-up
    for _ in range(repeats):
        for v in VARIANTS:
            start = time.perf_counter()
            step(losses[v], logits, target)
            times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}, values


def _ensure_package_importable() -> None:
    try:
        import segmenter  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    _ensure_package_importable()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 1, 128, 128, 128])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.memory_of:
        print(f"{measure_memory(args.memory_of, shape):.3f}")
        return 0

    ms, values = time_variants(shape, args.repeats)
    mib = {
        v: statistics.median(memory_in_subprocess(v, shape) for _ in range(args.memory_runs))
        for v in VARIANTS
    }
    input_mib = 2 * torch.Size(shape).numel() * 4 / 2**20
    print(
        f"FocalDiceLoss vs MONAI DiceFocalLoss, sigmoid, logits {shape} float32 (inputs "
        f"{input_mib:.0f} MiB), {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{'variant':<12}{'fwd+bwd ms (median)':>22}{'peak extra MiB':>17}{'loss':>12}")
    for v in VARIANTS:
        print(f"{v:<12}{ms[v]:>22.1f}{mib[v]:>17.1f}{values[v]:>12.6f}")
    t_ratio, m_ratio = ms["segmenter"] / ms["monai"], mib["segmenter"] / mib["monai"]
    print(f"{'ratio ours/monai':<12}{t_ratio:>18.2f}{m_ratio:>17.2f}")
    ok = t_ratio <= 1.0 and m_ratio <= 1.0
    print("requirement (ours no slower, no more peak memory):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
