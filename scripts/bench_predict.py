"""Benchmark: ``segmenter predict`` as users call it, against MONAI's tutorial inference, same run.

For each shipped dataset config (default: ``configs/ms_lesions.yaml`` on a 182x218x182 scan,
``configs/brats_wholetumour.yaml`` on a 240x240x155 one), a run folder with the config's
default network and random weights (seeded; timing needs no training) is written, and then,
each as a whole process (start-up, reading, preprocessing, windows, mirroring, restoring,
writing), with and without the 8-fold mirroring:

- ours: ``python -m segmenter.cli predict --model RUN --input CASE_0000 ... --output MASK``;
- MONAI: ``UNet(16, 32, 64, 128, 256; num_res_units 2)`` with random weights and
  ``sliding_window_inference`` (96^3 windows, overlap 0.5, Gaussian weights), the same 8
  mirrorings, on the scan z-scored inside its nonzero mask, read and written with nibabel.

The scans are the first case of ``../shared/data``'s MS and BraTS datasets when they are
there (four channels each), else synthetic four-channel volumes of the same shapes (a
brain-sized ellipsoid of smooth noise). Prints wall-clock seconds, peak resident memory
(``wait4``'s ``ru_maxrss`` of each process; the script itself stays small, since Linux
carries a parent's peak over to its children) and the ratio MONAI / ours with the same
mirroring, then the CUDA figures when a GPU is present (or says they were skipped). Runs
are one at a time; run it on an otherwise idle machine. Always exits 0 unless a child fails.

Fidelity: on a trained demo model (``segmenter demo``, 2 minutes, or ``--demo-run RUN``),
the Dice between the masks of ``predict``'s path (per-window mirroring, windows of the
config) and of the plain reference path (each of the 8 mirrorings of the whole volume through
MONAI's ``sliding_window_inference``, averaged) on the demo's test phantoms (must stay >= 0.99).

    python scripts/bench_predict.py [--quick] [--repeats 1] [--keep DIR] [--demo-run RUN]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
#: (config, dataset folder under ../shared/data, synthetic shape when the data is absent)
SETUPS = (
    ("configs/ms_lesions.yaml", "Dataset002_MSLesjak", (182, 218, 182)),
    ("configs/brats_wholetumour.yaml", "Dataset001_BraTS18WholeTumour", (240, 240, 155)),
)
CHANNELS = ("FLAIR", "T1", "T1ce", "T2")


@dataclass(frozen=True)
class Timing:
    """One whole-process run."""

    seconds: float
    peak_mb: float


def run_timed(argv: list[str]) -> Timing:
    """Wall-clock seconds and peak RSS (MB) of one child process; raises if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return Timing(seconds, usage.ru_maxrss / 1024.0)


# ------------------------------------------------------------------------------ set-up


def scan_files(folder: Path, dataset: str, shape: tuple[int, int, int], quick: bool) -> list[Path]:
    """The four channel files of the first case of ``dataset``, or synthetic ones."""
    images = SHARED / dataset / "imagesTr"
    if images.is_dir() and not quick:
        first = sorted(images.glob("*_0000.nii.gz"))[0]
        case = first.name[: -len("_0000.nii.gz")]
        return [images / f"{case}_{c:04d}.nii.gz" for c in range(len(CHANNELS))]
    from segmenter.io import write_image

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(axis=0) < 0.7**2
    paths = []
    for c in range(len(CHANNELS)):
        coarse = rng.random(tuple(max(n // 16, 2) for n in shape)).astype(np.float32)
        reps = [int(np.ceil(n / m)) for n, m in zip(shape, coarse.shape, strict=True)]
        field = np.kron(coarse, np.ones(reps, np.float32))[: shape[0], : shape[1], : shape[2]]
        image = np.where(inside, 100.0 + 50.0 * field + rng.normal(0, 5, shape), 0.0)
        path = folder / f"synthetic_{c:04d}.nii.gz"
        write_image(path, image.astype(np.float32), np.eye(4))
        paths.append(path)
    return paths


def random_run(config: str, out: Path, quick: bool) -> Path:
    """A run folder with the config's network and preprocessing, random weights (seed 0)."""
    import torch

    from segmenter.atomic import write_text
    from segmenter.config import load_config, save_config
    from segmenter.inference.predictor import build_from_plan
    from segmenter.nn.checkpoint import save_checkpoint
    from segmenter.planning.run_plan import RunPlan
    from segmenter.preprocessing.spec import PreprocessingSpec
    from segmenter.training.schedule import build_optimizer
    from segmenter.training.state import TrainState

    overrides = ["data.patch_size=[32, 32, 32]", "model.base_filters=4"] if quick else []
    cfg = load_config(REPO / config, overrides)
    p = cfg.data.patch_size
    plan = RunPlan(
        dataset=Path(cfg.data.dataset).name, channel_names=CHANNELS,
        labels={"background": 0, "lesion": 1}, activation=cfg.loss.activation,
        out_channels=1 if cfg.loss.activation == "sigmoid" else 2, patch_size=(p[0], p[1], p[2]),
        preprocessing=PreprocessingSpec.from_data(cfg.data), median_spacing=(1.0, 1.0, 1.0),
        threshold=cfg.inference.threshold, min_lesion_mm3=cfg.inference.min_lesion_mm3, fold=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_from_plan(cfg, plan)
    state = TrainState().checkpoint(model, build_optimizer(cfg.train, model), cfg, plan)
    save_checkpoint(out / "checkpoints" / "best.pt", state)
    save_config(cfg, out / "config.yaml")
    write_text(out / "plan.json", json.dumps(plan.to_json(), indent=2))
    return out


# -------------------------------------------------------------------------- MONAI child


def monai_predict(inputs: list[str], output: str, tta: bool, roi: int) -> None:
    """The MONAI tutorial's inference as a user writes it (run in a child process)."""
    import nibabel as nib
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    torch.set_num_threads(2)
    imgs = [nib.load(p) for p in inputs]
    x = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs])
    mask = (x != 0).any(axis=0)
    for c in range(len(x)):
        vals = x[c][mask]
        x[c] = np.where(mask, (x[c] - vals.mean()) / max(vals.std(), 1e-8), 0.0)
    torch.manual_seed(0)
    channels, strides = (16, 32, 64, 128, 256), (2, 2, 2, 2)
    net = UNet(3, len(x), 1, channels=channels, strides=strides, num_res_units=2).eval()
    t = torch.from_numpy(x)[None]
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [()]
    total = torch.zeros((1, 1, *x.shape[1:]))
    with torch.no_grad():
        for axes in flips:
            xi = torch.flip(t, axes) if axes else t
            out = sliding_window_inference(xi, (roi,) * 3, 4, net, overlap=0.5, mode="gaussian")
            total += torch.flip(out, axes) if axes else out
    prob = torch.sigmoid(total / len(flips))[0, 0].numpy()
    nib.save(nib.Nifti1Image((prob > 0.5).astype(np.uint8), imgs[0].affine), output)


# ----------------------------------------------------------------------- fidelity child


def reference_logits(predictor, image: np.ndarray):  # noqa: ANN001, ANN201 (torch-free module)
    """The plain 8-pass path: each mirroring of the whole volume through MONAI's sliding window
    (the training patch, overlap 0.5, Gaussian sigma 1/8), flipped back and averaged."""
    import torch
    from monai.inferers import sliding_window_inference

    from segmenter.inference.sliding_window import MIRROR_AXES

    x = torch.from_numpy(np.array(image, np.float32))[None]
    total = None
    with torch.no_grad():
        for axes in MIRROR_AXES:
            xi = torch.flip(x, axes) if axes else x
            out = sliding_window_inference(
                xi, predictor.patch_size, 2, predictor.model, overlap=0.5, mode="gaussian",
                sigma_scale=0.125,
            )  # fmt: skip
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
    return (total / len(MIRROR_AXES))[0].numpy()


def fidelity(run: str, images: str) -> list[float]:
    """Dice of ``predict``'s mask against the reference path's, per test case of the run."""
    import torch

    from segmenter.data.layout import find_cases
    from segmenter.evaluation.metrics import dice
    from segmenter.inference.predictor import load_predictor
    from segmenter.inference.sliding_window import foreground_probability, predict_logits
    from segmenter.preprocessing.case import preprocess_arrays, read_case

    torch.set_num_threads(2)
    pred = load_predictor(run, device="cpu")
    scores = []
    for case in find_cases(Path(images), len(pred.channel_names), ".nii.gz"):
        imgs, _ = read_case(case, with_label=False)
        pre = preprocess_arrays([im.array for im in imgs], None, imgs[0].affine, imgs[0].spacing,
                                case_id=case.case_id, spec=pred.plan.preprocessing)  # fmt: skip
        fast = predict_logits(pred.model, pre.image, pred.patch_size, pred.config.inference,
                              device=pred.device, tta=True)  # fmt: skip
        masks = [foreground_probability(lg, pred.plan.activation) >= pred.plan.threshold
                 for lg in (fast, reference_logits(pred, pre.image))]  # fmt: skip
        scores.append(float(dice(masks[0].astype(np.uint8), masks[1].astype(np.uint8))))
    return scores


def report_fidelity(work: Path, demo_run: str | None) -> None:
    """Train a demo model (unless given) and print the fidelity Dice of its test phantoms."""
    if demo_run is None:
        subprocess.run([sys.executable, "-m", "segmenter.cli", "demo", "--out", str(work / "demo"),
                        "--minutes", "2"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
        demo_run = str(work / "demo" / "run")
    images = Path(demo_run).parent / "data" / "Dataset900_Phantom" / "imagesTs"
    argv = [sys.executable, __file__, "--fidelity-child", demo_run, str(images)]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
    scores = json.loads(out.strip().splitlines()[-1])
    print(f"\nfidelity on {len(scores)} demo test phantoms ({demo_run}): Dice of predict's mask "
          f"against the plain 8-pass reference path: mean {np.mean(scores):.4f}, "
          f"min {np.min(scores):.4f} (must stay >= 0.99)")  # fmt: skip


# ---------------------------------------------------------------------------------- main


def prepare(config: str, dataset: str, shape: tuple[int, int, int], folder: Path,
            quick: bool) -> tuple[Path, list[Path]]:  # fmt: skip
    """The run folder and scans, made in a child process: Linux's ``ru_maxrss`` carries a
    process's peak over to what it starts, so this process never imports torch or holds a
    volume, and the children's peaks are their own."""
    argv = [sys.executable, __file__, "--prepare", config, dataset, *map(str, shape), str(folder),
            "1" if quick else "0"]  # fmt: skip
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
    made = json.loads(out.strip().splitlines()[-1])
    return Path(made["run"]), [Path(p) for p in made["scans"]]


def bench(config: str, dataset: str, shape: tuple[int, int, int], args: argparse.Namespace,
          work: Path) -> list[tuple[str, str, Timing]]:  # fmt: skip
    """Rows (pipeline, mirroring, timing) for one config and scan."""
    folder = work / Path(config).stem
    folder.mkdir(parents=True, exist_ok=True)
    run, scans = prepare(config, dataset, shape, folder, args.quick)
    rows = []
    for tta in (True, False):
        inputs = [str(s) for s in scans]
        ours = [sys.executable, "-m", "segmenter.cli", "predict", "--model", str(run),
                "--input", *inputs, "--output", str(folder / "ours.nii.gz"),
                "--device", args.device, *([] if tta else ["--no-tta"])]  # fmt: skip
        roi = str(32 if args.quick else 96)
        monai = [sys.executable, __file__, "--monai-child", *inputs,
                 str(folder / "monai.nii.gz"), "1" if tta else "0", roi]  # fmt: skip
        for name, argv in (("segmenter", ours), ("MONAI", monai)):
            best = min((run_timed(argv) for _ in range(args.repeats)), key=lambda t: t.seconds)
            rows.append((name, "8 flips" if tta else "none", best))
    return rows


def report(title: str, rows: list[tuple[str, str, Timing]]) -> None:
    print(f"\n{title}")
    print(f"{'pipeline':<12}{'mirroring':<11}{'seconds':>9}{'peak MB':>10}{'MONAI/ours':>12}")
    ours = {m: t for n, m, t in rows if n == "segmenter"}
    for name, mirroring, t in rows:
        ratio = f"{t.seconds / ours[mirroring].seconds:.2f}" if name == "MONAI" else ""
        print(f"{name:<12}{mirroring:<11}{t.seconds:>9.1f}{t.peak_mb:>10.0f}{ratio:>12}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny synthetic scans (a smoke run)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (the fastest kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", help="keep the run folders, scans and masks in this folder")
    parser.add_argument("--demo-run", help="trained demo run for the fidelity check (else trained)")
    parser.add_argument("--monai-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--fidelity-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        config, dataset, x, y, z, folder, quick = args.prepare
        scans = scan_files(Path(folder), dataset, (int(x), int(y), int(z)), quick == "1")
        run = random_run(config, Path(folder) / "run", quick == "1")
        print(json.dumps({"run": str(run), "scans": [str(p) for p in scans]}))
        return 0
    if args.fidelity_child:
        print(json.dumps(fidelity(*args.fidelity_child)))
        return 0
    if args.monai_child:
        *inputs, output, tta, roi = args.monai_child
        monai_predict(inputs, output, tta == "1", int(roi))
        return 0
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        print(f"2 CPU threads, load average {os.getloadavg()[0]:.2f} at the start")
        for config, dataset, shape in SETUPS:
            shape = (48, 56, 40) if args.quick else shape
            real = (SHARED / dataset).is_dir() and not args.quick
            scan = f"{dataset} first case" if real else f"synthetic {'x'.join(map(str, shape))}"
            rows = bench(config, dataset, shape, args, work)
            report(f"{config} ({scan}, 4 channels), {args.device}", rows)
        probe = "import torch; print(int(torch.cuda.is_available()))"
        cuda = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        if cuda.stdout.strip() == "1" and args.device == "cpu":
            print("\nCUDA present: rerun with --device cuda for the GPU figures")
        elif cuda.stdout.strip() != "1":
            print("\nCUDA: no GPU here, GPU figures skipped")
        report_fidelity(work, args.demo_run)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
