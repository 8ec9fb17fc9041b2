"""Which reference lesions a model misses, and why: size, probability and contrast per lesion.

For every replicate of a `segmenter compare` folder (or one replicate folder: anything holding
`reference/`, `predictions/probabilities/` and `evaluation/lesions.csv`), per reference lesion
of each held-out case: its volume, whether `evaluate` counted it found (`status` TP in
`lesions.csv`, the config's lesion rule), the highest foreground probability inside it, and the
mean intensity of each channel inside it after the case's own normalisation (the z-score the
network sees: `segmenter.preprocessing.normalisation.normalise` with the config's settings,
statistics over the brain).

Printed per variant: one line per lesion with `--lesions`, then found against missed lesions:
how many, median volume, median highest probability, how many missed ones never reach 0.1
(no threshold recovers them), and the mean contrast per channel.

    python scripts/missed_lesions.py runs/exp_ms_loss [--variant f16] [--lesions]
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segmenter.config import load_config
from segmenter.data.layout import load_dataset
from segmenter.errors import InputError
from segmenter.evaluation import metrics
from segmenter.evaluation.components import label_components
from segmenter.inference.predict import PROBABILITY_FOLDER
from segmenter.io import read_image
from segmenter.preprocessing.normalisation import normalise

#: Probability below which a missed lesion is out of reach of any threshold.
UNREACHABLE = 0.1


@dataclass(frozen=True)
class Lesion:
    """One reference lesion of a held-out case."""

    case_id: str
    volume_mm3: float
    found: bool
    max_probability: float
    contrast: tuple[float, ...]


def replicates(folder: Path, variant: str | None) -> dict[str, list[Path]]:
    """Replicate folders by variant: ``variants/<name>/<replicate>`` of a compare folder, or
    ``folder`` itself (variant ``-``) when it is one replicate."""
    if (folder / "evaluation" / "lesions.csv").is_file():
        return {"-": [folder]}
    found: dict[str, list[Path]] = {}
    for table in sorted(folder.glob("variants/*/*/evaluation/lesions.csv")):
        rep = table.parents[1]
        if variant is None or rep.parent.name == variant:
            found.setdefault(rep.parent.name, []).append(rep)
    return found


def case_lesions(rep: Path, case_id: str, status: list[tuple[np.ndarray, bool]]) -> list[Lesion]:
    """The reference lesions of one held-out case of replicate ``rep``.

    Args:
        rep: replicate folder (its ``config.yaml`` names the dataset and normalisation).
        case_id: the case.
        status: ``lesions.csv``'s reference lesions: voxel centroid and verdict (True:
            found); each lesion labelled here takes the verdict of the nearest centroid.
    """
    cfg = load_config(rep / "config.yaml")
    rule = metrics.PRESETS[cfg.evaluation.preset]
    dataset = load_dataset(cfg.data.dataset)
    ending = dataset.file_ending
    ref = read_image(rep / "reference" / f"{case_id}{ending}")
    prob = read_image(rep / "predictions" / PROBABILITY_FOLDER / f"{case_id}{ending}").array
    by_id = {c.case_id: c for c in dataset.training}
    images = np.stack([read_image(p).array for p in by_id[case_id].images]).astype(np.float32)
    z, _ = normalise(images, cfg.data.clip_percentiles, cfg.data.normalization)
    labels, n = label_components(ref.array > 0, connectivity=rule.connectivity)
    voxel_mm3 = float(np.prod(ref.spacing))
    if n != len(status):
        raise InputError(
            f"{rep}: {case_id} has {n} reference lesions, its lesions.csv {len(status)} "
            f"(written under another lesion rule?)"
        )
    out = []
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(1, n + 2))
    centroids = np.stack([c for c, _ in status])
    for k in range(1, n + 1):
        idx = order[bounds[k - 1] : bounds[k]]
        centre = np.stack(np.unravel_index(idx, labels.shape), axis=1).mean(axis=0)
        nearest = int(np.argmin(np.linalg.norm(centroids - centre, axis=1)))
        out.append(Lesion(
            case_id=case_id, volume_mm3=len(idx) * voxel_mm3, found=status[nearest][1],
            max_probability=float(prob.ravel()[idx].max()),
            contrast=tuple(float(z[c].ravel()[idx].mean()) for c in range(len(z))),
        ))  # fmt: skip
    return out


def replicate_lesions(rep: Path) -> list[Lesion]:
    """Every reference lesion of every held-out case of ``rep``, case by case."""
    status: dict[str, list[tuple[np.ndarray, bool]]] = {}
    with (rep / "evaluation" / "lesions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == "ref":
                centre = np.array([float(row[f"centroid_{a}"]) for a in "ijk"])
                status.setdefault(row["case_id"], []).append((centre, row["status"] == "TP"))
    return [les for case, s in status.items() for les in case_lesions(rep, case, s)]


def summary_lines(lesions: list[Lesion], channels: list[str]) -> list[str]:
    """Found against missed: count, median volume and probability, contrast per channel."""
    lines = [f"{'':<8}{'n':>5}{'median mm3':>12}{'median p':>10}{'p < 0.1':>9}  mean z: "
             + " ".join(f"{c:>7}" for c in channels)]  # fmt: skip
    for name, group in (("found", [x for x in lesions if x.found]),
                        ("missed", [x for x in lesions if not x.found])):  # fmt: skip
        if not group:
            lines.append(f"{name:<8}{0:>5}")
            continue
        below = sum(x.max_probability < UNREACHABLE for x in group)
        z = np.mean([x.contrast for x in group], axis=0)
        lines.append(
            f"{name:<8}{len(group):>5}{np.median([x.volume_mm3 for x in group]):>12.1f}"
            f"{np.median([x.max_probability for x in group]):>10.3f}{below:>9}          "
            + " ".join(f"{v:>7.2f}" for v in z)
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a segmenter compare folder or one replicate")
    ap.add_argument("--variant", help="only this variant")
    ap.add_argument("--lesions", action="store_true", help="also one line per lesion")
    args = ap.parse_args(argv)
    reps = replicates(args.folder, args.variant)
    if not reps:
        print(f"error: {args.folder}: no replicate with evaluation/lesions.csv", file=sys.stderr)
        return 2
    for name, folders in reps.items():
        try:
            cfg = load_config(folders[0] / "config.yaml")
            channels = list(load_dataset(cfg.data.dataset).channel_names.values())
            lesions = [les for rep in folders for les in replicate_lesions(rep)]
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"variant {name}: {len(folders)} replicate(s), {len(lesions)} reference lesions, "
              f"rule {cfg.evaluation.preset}")  # fmt: skip
        if args.lesions:
            for x in sorted(lesions, key=lambda x: (x.case_id, x.volume_mm3)):
                print(f"  {x.case_id:<16}{x.volume_mm3:>9.1f} mm3  "
                      f"{'found ' if x.found else 'missed'}  p {x.max_probability:.3f}  z "
                      + " ".join(f"{v:>6.2f}" for v in x.contrast))  # fmt: skip
        for line in summary_lines(lesions, channels):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
