"""Benchmark: lesion metrics (default ``isles22`` preset) against panoptica on real lesion masks.

For every mask in ``DATA/MSLesjak_masks_only`` a synthetic prediction is made (erosion, dilation,
shift, dropped lesions or boundary noise, in turn), then
``segmenter.evaluation.metrics.lesion_metrics`` and
panoptica's evaluator (connected components, IoU >= 0.5 naive matching, instance metrics IoU and
Dice only, its leanest useful setting) are timed on the same arrays in the same process, best of
``--repeats``. Prints one row per case and the ratio panoptica / ours.

    python scripts/bench_metrics.py [--data ../shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

from segmenter.data.synthetic import PERTURBATIONS, perturb_mask
from segmenter.evaluation import metrics
from segmenter.io import read_image

REPO = Path(__file__).resolve().parents[1]
KINDS = PERTURBATIONS


def best_of(repeats: int, fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Shortest wall time of ``fn(*args, **kwargs)`` over ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


COLUMNS = (
    ("case", "<10"), ("kind", "<6"), ("ref", ">4"), ("pred", ">4"), ("ours_s", ">7"),
    ("voxel_s", ">7"), ("panopt_s", ">8"), ("ratio", ">6"),
)  # fmt: skip


def row(*cells: object) -> str:
    return " ".join(f"{c:{fmt}}" for c, (_, fmt) in zip(cells, COLUMNS, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = args.data / "MSLesjak_masks_only"
    files = sorted(folder.glob("*.nii.gz"))
    if not files:
        print(f"{folder}: no masks found", file=sys.stderr)
        return 2
    import panoptica

    panoptica.disable_citation_reminder()
    evaluator = panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.SEMANTIC,
        instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),
        instance_matcher=panoptica.NaiveThresholdMatching(
            matching_metric=panoptica.Metric.IOU, matching_threshold=0.5
        ),
        instance_metrics=[panoptica.Metric.IOU, panoptica.Metric.DSC],
        global_metrics=[panoptica.Metric.DSC],
    )
    rng = np.random.default_rng(args.seed)
    print(
        f"lesion_metrics (isles22) vs panoptica {version('panoptica')} on {len(files)} masks "
        f"({folder}), best of {args.repeats}, {os.cpu_count()} CPUs"
    )
    head = row(*(name for name, _ in COLUMNS))
    print(head + "\n" + "-" * len(head))
    ours_all, theirs_all = [], []
    for i, path in enumerate(files):
        img = read_image(path)
        ref = img.array > 0
        kind = KINDS[i % len(KINDS)]
        pred = perturb_mask(ref, kind, rng)
        pred_u8, ref_u8 = pred.astype(np.uint8), ref.astype(np.uint8)
        s = metrics.lesion_metrics(pred, ref, img.spacing).summary
        ours = best_of(args.repeats, metrics.lesion_metrics, pred, ref, img.spacing)
        voxel = best_of(args.repeats, metrics.voxel_metrics, pred, ref, img.spacing)
        theirs = best_of(
            args.repeats, evaluator.evaluate, pred_u8, ref_u8, voxelspacing=img.spacing
        )
        ours_all.append(ours)
        theirs_all.append(theirs)
        print(
            row(
                path.name.split("_")[0], kind, s["n_ref"], s["n_pred"], f"{ours:.3f}",
                f"{voxel:.3f}", f"{theirs:.3f}", f"{theirs / ours:.1f}x",
            )
        )  # fmt: skip
    ratios = [t / o for t, o in zip(theirs_all, ours_all, strict=True)]
    print("-" * len(head))
    print(
        f"ours: median {statistics.median(ours_all):.3f} s, max {max(ours_all):.3f} s, total "
        f"{sum(ours_all):.2f} s | panoptica: median {statistics.median(theirs_all):.3f} s, total "
        f"{sum(theirs_all):.2f} s | panoptica/ours: median {statistics.median(ratios):.1f}x, "
        f"min {min(ratios):.1f}x, total {sum(theirs_all) / sum(ours_all):.1f}x"
    )
    process_timing(files, args.repeats, args.seed)
    return 0


PANOPTICA_SCRIPT = """
import json, sys
from pathlib import Path
import nibabel as nib
import numpy as np
import panoptica
panoptica.disable_citation_reminder()
ev = panoptica.Panoptica_Evaluator(
    expected_input=panoptica.InputType.SEMANTIC,
    instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),
    instance_matcher=panoptica.NaiveThresholdMatching(
        matching_metric=panoptica.Metric.IOU, matching_threshold=0.5),
    instance_metrics=[panoptica.Metric.IOU, panoptica.Metric.DSC],
    global_metrics=[panoptica.Metric.DSC],
)
pred_dir, ref_dir, out = map(Path, sys.argv[1:4])
results = {}
for ref_path in sorted(ref_dir.glob("*.nii.gz")):
    ref = nib.load(ref_path)
    pred = nib.load(pred_dir / ref_path.name)
    r = ev.evaluate(np.asarray(pred.dataobj, np.uint8), np.asarray(ref.dataobj, np.uint8),
                    voxelspacing=ref.header.get_zooms()[:3])
    results[ref_path.name] = str(r)
out.write_text(json.dumps(results))
"""


def process_timing(files: list[Path], repeats: int, seed: int) -> None:
    """Time ``segmenter evaluate`` as a whole process against a panoptica script, same files."""
    import subprocess
    import tempfile

    from segmenter.io import write_like

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, path in enumerate(files):
            img = read_image(path)
            ref = (img.array > 0).astype(np.uint8)
            pred = perturb_mask(ref > 0, KINDS[i % len(KINDS)], rng).astype(np.uint8)
            write_like(root / "ref" / path.name, ref, img)
            write_like(root / "pred" / path.name, pred, img)
        ours_cmd = [
            sys.executable, "-m", "segmenter.cli", "evaluate", "--pred", str(root / "pred"),
            "--ref", str(root / "ref"), "--out", str(root / "eval"),
        ]  # fmt: skip
        theirs_cmd = [
            sys.executable, "-c", PANOPTICA_SCRIPT, str(root / "pred"), str(root / "ref"),
            str(root / "panoptica.json"),
        ]  # fmt: skip

        def run(cmd: list[str]) -> None:
            subprocess.run(cmd, check=True, capture_output=True)

        ours = best_of(repeats, run, ours_cmd)
        theirs = best_of(repeats, run, theirs_cmd)
    print(
        f"whole process on {len(files)} cases (read .nii.gz, all metrics, write results), best of "
        f"{repeats}: segmenter evaluate {ours:.2f} s (voxel metrics + HD95 + lesions, 2 "
        f"workers) | panoptica script {theirs:.2f} s (lesion matching only) | ratio "
        f"{theirs / ours:.1f}x"
    )


if __name__ == "__main__":
    raise SystemExit(main())
