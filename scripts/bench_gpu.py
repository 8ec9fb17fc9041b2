"""Training throughput on a CUDA GPU: steps per second and peak GPU memory of the shipped
configs' networks and of the `gpu` plan budget's nnU-Net-like topology.

Each setting runs the real training step (`segmenter.training.speed.measure_step`: forward,
focal + Dice loss, backward, clipping, AdamW; fp16 autocast with a GradScaler, as
`train.precision: auto` picks on CUDA) on random batches, after warm-up steps, with
`torch.backends.cudnn.benchmark` on. Without a CUDA device it says so and exits 0 (the CPU
figures come from `scripts/bench_train.py`).

    python scripts/bench_gpu.py [--steps 20] [--warmup 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from segmenter.config import apply_values, load_config
from segmenter.training.speed import measure_step

ROOT = Path(__file__).resolve().parents[1]

#: (label, config file, overrides): the shipped configs as they train, and the gpu budget's
#: plain topology (32 base filters, two convolutions per stage, 128^3 patches, batch 2).
SETTINGS = (
    ("ms_lesions", "configs/ms_lesions.yaml", {}),
    ("brats_wholetumour", "configs/brats_wholetumour.yaml", {}),
    ("gpu plan, 32 filters, 128^3", "configs/default.yaml", {
        "data.patch_size": [128, 128, 128], "model.depth": 6, "model.base_filters": 32,
        "model.max_filters": 320, "model.encoder_convs": [2], "model.decoder_convs": [2],
    }),
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped (CPU figures: scripts/bench_train.py)")
        return 0
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'setting':<30} {'patch':>14} {'batch':>5} {'steps/s':>8} {'GPU MiB':>8}")
    for label, path, values in SETTINGS:
        cfg = apply_values(load_config(ROOT / path), {**values, "train.device": "cuda"})
        torch.cuda.reset_peak_memory_stats()
        timing = measure_step(cfg, 4, steps=args.steps, warmup=args.warmup)
        peak = torch.cuda.max_memory_allocated() / 2**20
        patch = "x".join(str(p) for p in cfg.data.patch_size)
        print(f"{label:<30} {patch:>14} {cfg.data.batch_size:>5} "
              f"{1.0 / timing.seconds_per_step:>8.2f} {peak:>8.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
