"""Command-line interface: ``segmenter <command> ...``.

The only module that reads argv, sets up logging and picks exit codes: 0 ok, 2 bad input or
usage, 1 internal error. Sub-commands import their modules lazily so that ``segmenter evaluate``
and ``segmenter verify`` start without importing torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from segmenter import __version__
from segmenter.errors import InputError

T = TypeVar("T")
log = logging.getLogger("segmenter")


def _progress(desc: str, unit: str = "case") -> Any:
    """A ``progress(iterable, total)`` wrapper drawing a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    def wrap(iterable: Iterable[T], total: int) -> Iterable[T]:
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    return wrap


def _cmd_synth(args: argparse.Namespace) -> int:
    from segmenter import synthetic

    spacing = tuple(args.spacing) if args.spacing else (1.0, 1.0, 1.0)
    spec = synthetic.PhantomSpec(
        size=args.size, channels=args.channels, spacing=spacing, oblique=args.oblique
    )
    try:
        root = synthetic.write_dataset(
            args.out,
            args.cases,
            args.seed,
            spec,
            n_test=args.test_cases,
            overwrite=args.overwrite,
            progress=True,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    print(f"wrote {args.cases} training and {args.test_cases} test cases to {root}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from segmenter import data

    problems = data.verify_dataset(args.dataset, progress=True)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.dataset}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: ok")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from segmenter import evaluate, report

    start = time.perf_counter()
    out = Path(args.out) if args.out else Path(args.pred)
    summary = evaluate.evaluate_folders(
        args.pred,
        args.ref,
        preset=args.preset,
        out_dir=out,
        workers=args.workers,
        progress=_progress("evaluate"),
    )
    print(report.format_table(summary))
    print(
        f"{summary['n_cases']} cases, preset {args.preset}, "
        f"{time.perf_counter() - start:.1f} s; wrote {out / 'summary.json'} and "
        f"{out / 'lesions.csv'}"
    )
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="segmenter",
        description="3D lesion segmentation for MRI: train, predict, evaluate lesion-level.",
    )
    parser.add_argument("--version", action="version", version=f"segmenter {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write a synthetic phantom dataset (nnU-Net raw layout)")
    p.add_argument("--out", required=True, help="output folder (the dataset goes inside)")
    p.add_argument("--cases", type=_positive_int, default=20, help="training cases (default 20)")
    p.add_argument("--test-cases", type=int, default=0, help="extra test cases (imagesTs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--size", type=_positive_int, default=64, help="volume edge in voxels")
    p.add_argument("--channels", type=_positive_int, default=2, help="MRI channels (FLAIR, T1..)")
    p.add_argument(
        "--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="voxel size in mm"
    )
    p.add_argument("--oblique", action="store_true", help="a rotated, non-identity affine")
    p.add_argument("--overwrite", action="store_true", help="replace an existing phantom dataset")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("verify", help="check a dataset: geometry, labels, channels, NaN")
    p.add_argument("dataset", help="nnU-Net raw dataset folder (DatasetXXX_Name)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("evaluate", help="voxel and lesion-level metrics of predictions")
    p.add_argument("--pred", required=True, help="folder of predicted masks")
    p.add_argument("--ref", required=True, help="folder of reference masks (same case ids)")
    p.add_argument(
        "--preset",
        default="isles22",
        choices=("isles22", "atlas", "brats23", "msseg", "panoptica"),
        help="lesion matching rule (default isles22: any overlap, 26-connectivity)",
    )
    p.add_argument("--out", help="where summary.json and lesions.csv go (default: --pred)")
    p.add_argument("--workers", type=_positive_int, default=2, help="cases in parallel")
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or usage, 1 internal error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors exit 2
        return int(exc.code) if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        log.exception("internal error (please report with the command line above)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
