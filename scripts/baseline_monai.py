"""Baseline: what a MONAI user would write, trained on our split and scored by our evaluate.

MONAI's tutorial recipe for 3D segmentation, unchanged in spirit: ``LoadImaged`` +
``EnsureChannelFirstd`` + ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` +
``CropForegroundd`` + ``SpatialPadd`` (to the patch) + ``RandCropByPosNegLabeld`` (pos 1, neg 1,
2 samples per volume) + random flips; ``UNet(16, 32, 64, 128, 256, strides 2, num_res_units=2)``
with two output channels; ``DiceCELoss(to_onehot_y=True, softmax=True)``; Adam (lr 1e-4) in
float32; then ``sliding_window_inference`` (the training patch, overlap 0.5, Gaussian) on each
held-out scan as it is on disk and an argmax. Labels are merged to lesion vs background (``label
> 0``), as our models see them.

The split is one of our runs' ``splits.json`` (``--splits RUN/splits.json --fold K``), so both
pipelines train on the same cases and are scored on the same held-out cases; training stops
at the first iteration after ``--minutes`` of wall clock (data loading included), the budget
our ``train.max_minutes`` means. The masks are written with each scan's own affine and scored
with ``segmenter.evaluation.evaluate.evaluate_folders`` (same preset and size bins as our runs), so
the numbers print and land in ``OUT/evaluation/summary.json`` exactly as ``segmenter evaluate``'s.

    python scripts/baseline_monai.py --dataset DATASET --splits RUN/splits.json --fold 0 \\
        --minutes 25 --out runs/baseline_fold0 [--patch 96 96 96] [--preset brats23]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    SpatialPadd,
)
from monai.utils import set_determinism

from segmenter.atomic import write_text
from segmenter.data.layout import load_dataset
from segmenter.evaluation.evaluate import evaluate_folders
from segmenter.evaluation.report import format_table, summary_json

#: MONAI's ``UNet(strides=(2, 2, 2, 2))`` halves each axis four times: sizes must divide by 16.
UNET_DIVISOR = 16


def monai_patch(patch: list[int]) -> tuple[int, ...]:
    """``patch`` with each axis rounded up to a multiple of :data:`UNET_DIVISOR` (a thick-slice
    patch of 12 slices becomes 16: the UNet's skip connections fail on 12)."""
    return tuple(-(-int(p) // UNET_DIVISOR) * UNET_DIVISOR for p in patch)


def items(dataset, ids: list[str]) -> list[dict]:
    by_id = {c.case_id: c for c in dataset.training}
    return [
        {"image": [str(p) for p in by_id[i].images], "label": str(by_id[i].label), "id": i}
        for i in ids
    ]


def train_transforms(patch: tuple[int, int, int]) -> Compose:
    return Compose([
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        Lambdad(keys="label", func=lambda x: (x > 0).float()),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        CropForegroundd(keys=["image", "label"], source_key="image"),
        SpatialPadd(keys=["image", "label"], spatial_size=patch),
        RandCropByPosNegLabeld(
            keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=1,
            num_samples=2,
        ),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
        EnsureTyped(keys=["image", "label"]),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--splits", required=True, help="splits.json of one of our runs")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget")
    parser.add_argument("--out", required=True)
    parser.add_argument("--patch", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--batch", type=int, default=1, help="volumes per step (x2 crops)")
    parser.add_argument("--preset", default="isles22")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    out = Path(args.out)
    dataset = load_dataset(args.dataset)
    split = json.loads(Path(args.splits).read_text())[args.fold]
    patch = monai_patch(args.patch)
    if list(patch) != list(args.patch):
        print(
            f"patch {list(args.patch)} rounded up to {list(patch)}: MONAI's UNet with four "
            f"stride-2 levels needs sizes divisible by {UNET_DIVISOR}"
        )
    n_channels = len(dataset.channel_names)

    loader = DataLoader(
        Dataset(items(dataset, split["train"]), transform=train_transforms(patch)),
        batch_size=args.batch, shuffle=True, num_workers=0,
    )  # fmt: skip
    model = UNet(
        spatial_dims=3, in_channels=n_channels, out_channels=2,
        channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
    )  # fmt: skip
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    start = time.perf_counter()
    budget = args.minutes * 60.0
    steps, epochs, done = 0, 0, False
    model.train()
    while not done:
        epochs += 1
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start > budget:
                done = True
                break
    train_s = time.perf_counter() - start
    print(f"trained {steps} steps ({epochs} passes over the {len(split['train'])} training "
          f"cases) in {train_s / 60:.1f} min")  # fmt: skip

    model.eval()
    preds, refs = out / "predictions", out / "reference"
    preds.mkdir(parents=True, exist_ok=True)
    refs.mkdir(parents=True, exist_ok=True)
    load = Compose([
        LoadImaged(keys=["image"], image_only=True),
        EnsureChannelFirstd(keys=["image"]),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ])  # fmt: skip
    seconds = []
    for item in items(dataset, split["val"]):
        t0 = time.perf_counter()
        image = load({"image": item["image"]})["image"]
        with torch.no_grad():
            logits = sliding_window_inference(
                image[None].float(), patch, 4, model, overlap=0.5, mode="gaussian"
            )
        mask = torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)
        ref = nib.load(item["label"])
        name = f"{item['id']}{dataset.file_ending}"
        nib.save(nib.Nifti1Image(mask, ref.affine, ref.header), preds / name)
        ref_data = (np.asarray(ref.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(ref_data, ref.affine, ref.header), refs / name)
        seconds.append(time.perf_counter() - t0)
    summary = evaluate_folders(preds, refs, preset=args.preset, out_dir=out / "evaluation")
    summary["seconds_per_case"] = float(np.mean(seconds))
    summary["training"] = {"minutes": train_s / 60, "steps": steps, "passes": epochs}
    write_text(out / "evaluation" / "summary.json", summary_json(summary))
    print(format_table(summary))
    pooled = summary["lesion"]["pooled"]
    print(
        f"MONAI baseline, fold {args.fold}: lesion recall {pooled['recall']:.3f}, precision "
        f"{pooled['precision']:.3f}, F1 {pooled['f1']:.3f}, Dice "
        f"{summary['foreground_mean']['Dice']:.3f}; {np.mean(seconds):.1f} s per case "
        f"(no TTA); training {train_s / 60:.1f} min, {steps} steps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
