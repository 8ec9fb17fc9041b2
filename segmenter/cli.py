"""Command-line interface: ``segmenter <command> ...``.

The only module that reads argv, sets up logging and picks exit codes: 0 ok, 2 bad input or
usage, 1 internal error or a system failure (a full disk, a read-only folder: one line, no
traceback), 130 interrupted by SIGINT (Ctrl-C), 143 stopped by SIGTERM. Training (``train``,
``crossval``, ``compare``) takes either signal as a request to stop at the next safe point: it
saves its progress and prints one line naming where it stopped and the command that resumes.
Sub-commands import their modules lazily so that ``segmenter evaluate`` and ``segmenter verify``
start without importing torch.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from segmenter import __version__
from segmenter.config import PRESET_NAMES
from segmenter.errors import InputError, Interrupted, PeerLost, TrainingFailed

T = TypeVar("T")
log = logging.getLogger("segmenter")


def _progress(desc: str, unit: str = "case") -> Any:
    """A ``progress(iterable, total)`` wrapper drawing a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    def wrap(iterable: Iterable[T], total: int) -> Iterable[T]:
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    return wrap


def _cmd_synth(args: argparse.Namespace) -> int:
    from segmenter.data import synthetic

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
    from segmenter.data import verify

    problems = verify.verify_dataset(args.dataset, progress=True)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.dataset}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: ok")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from segmenter import config as config_mod
    from segmenter.data.layout import load_dataset

    cfg = config_mod.load_config(args.config, args.set)
    dataset = load_dataset(args.dataset)
    out = Path(args.out) if args.out else Path("plans") / dataset.name
    if args.minutes is not None:
        cfg = config_mod.apply_values(cfg, {"plan.minutes": args.minutes})
    _plan_dataset(cfg, dataset, out, reuse_fingerprint=False)
    return 0


def _plan_dataset(cfg: Any, dataset: Any, out: Path, *, reuse_fingerprint: bool) -> dict[str, Any]:
    """``segmenter plan``'s work: the fingerprint (reused from ``out`` when asked and it lists
    the dataset's cases), the plan (and the width for ``plan.minutes``), both written to
    ``out`` and described; returns the plan."""
    import json

    from segmenter.atomic import write_text
    from segmenter.planning import fingerprint as fp_mod
    from segmenter.planning import planner

    fp = _saved_fingerprint(out / "fingerprint.json", dataset) if reuse_fingerprint else None
    if fp is None:
        fp = fp_mod.dataset_fingerprint(dataset, workers=2, progress=_progress("fingerprint"))
        fp_mod.write_fingerprint(fp, out / "fingerprint.json")
    else:
        print(f"fingerprint of {len(fp['cases'])} cases reused from {out / 'fingerprint.json'}")
    dataset_plan = planner.make_dataset_plan(fp, cfg)
    if cfg.plan.minutes is not None:
        dataset_plan.update(_width_for_budget(cfg, dataset_plan, dataset.n_channels))
    write_text(out / "plan.json", json.dumps(dataset_plan, indent=2) + "\n")
    print(_describe_dataset_plan(dataset.name, dataset_plan, fp["summary"]["lesions"]["total"]))
    print(f"wrote {out / 'fingerprint.json'} and {out / 'plan.json'}")
    return dataset_plan


def _saved_fingerprint(path: Path, dataset: Any) -> dict[str, Any] | None:
    """The fingerprint at ``path`` when it is of ``dataset`` (same folder, same cases)."""
    import json

    try:
        fp = json.loads(path.read_text())
        ids = [c["case_id"] for c in fp["cases"]]
        same = fp["dataset"] == str(dataset.root)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fp if same and ids == [c.case_id for c in dataset.training] else None


def _width_for_budget(cfg: Any, dataset_plan: dict[str, Any], n_channels: int) -> dict[str, Any]:
    """``base_filters`` and ``width_choice`` for the plan: each width timed here, on the plan's
    patch, depth and spacing (``plan.minutes``)."""
    from segmenter import config as config_mod
    from segmenter.planning import planner
    from segmenter.training import speed

    planned = config_mod.apply_values(cfg, planner.dataset_plan_values(dataset_plan))
    print(f"timing a training step of each width on this machine ({cfg.plan.minutes:g} min budget)")

    def show(t: Any) -> None:
        print(f"  {t.base_filters} base filters: {t.seconds_per_step:.2f} s per step")

    timings = speed.time_widths(planned, n_channels, on_timing=show)
    choice = planner.choose_width([(t.base_filters, t.seconds_per_step) for t in timings], cfg.plan)
    t = cfg.plan
    choice.update({
        "minutes": t.minutes, "min_steps": t.min_steps, "overhead": t.overhead,
        "device": cfg.train.device, "precision": cfg.train.precision, "threads": cfg.train.threads,
    })  # fmt: skip
    width = choice["base_filters"]
    return {
        "base_filters": width, "max_filters": max(cfg.model.max_filters, width),
        "width_choice": choice,
    }  # fmt: skip


def _describe_dataset_plan(name: str, plan: dict[str, Any], n_lesions: int) -> str:
    """What ``segmenter plan`` prints about the plan it wrote."""
    shape = [round(v) for v in plan["median_resampled_shape"]]
    schemes = ", ".join(f"{n['channel']} {n['scheme']}" for n in plan["normalization"])
    return "\n".join([
        f"{name}: {plan['n_cases']} cases, {n_lesions} lesions",
        f"target spacing {plan['target_spacing']} mm (anisotropic: {plan['anisotropic']}); "
        f"{plan['spacing_choice']['why']}",
        f"median shape at that spacing {shape}",
        f"patch {plan['patch_size']}, depth {plan['depth']}, batch {plan['batch_size']} "
        f"({plan['budget']} budget of {plan['budget_patch_voxels']} voxels per patch)",
        f"normalisation: {schemes}",
        *(
            [f"base filters {plan['base_filters']}: {plan['width_choice']['why']}"]
            if "width_choice" in plan
            else []
        ),
    ])  # fmt: skip


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from segmenter.evaluation import evaluate, report

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


def _cmd_train(args: argparse.Namespace) -> int:
    from segmenter import config as config_mod

    if args.resume:
        if not args.out:
            raise InputError("--resume needs --out RUN (the run folder to continue)")
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise InputError(f"{args.out}: nothing to resume (no config.yaml)")
        cfg = config_mod.load_config(saved, args.set)
    else:
        if not args.config:
            raise InputError("train needs --config CFG (or --resume --out RUN)")
        cfg = _experiment_config(args)
    fold: int | str = args.fold
    out = Path(args.out) if args.out else _default_run_dir(args.config, fold)
    from segmenter.nn import distributed
    from segmenter.training import loop

    dist = distributed.from_environment(os.environ)  # torchrun's variables: data-parallel
    if not dist.chief and not args.verbose:  # rank 0 reports; the others only warn
        logging.getLogger("segmenter").setLevel(logging.WARNING)
    result = loop.fit(cfg, out, fold=fold, resume=args.resume, progress=dist.chief, dist=dist)
    if not dist.chief:
        return 0
    how = "budget reached" if result.stopped_by_budget else "all epochs"
    if result.best_epoch >= 0:
        best = (
            f"best {cfg.train.best_metric} (moving average over validations) "
            f"{result.best_metric:.3f} at epoch {result.best_epoch}"
        )
    else:
        best = "no validation: best.pt is the last checkpoint"
    print(
        f"trained {result.epochs} epochs ({result.steps} steps, {how}) in "
        f"{result.seconds / 60:.1f} min; {best}; the step waited "
        f"for data {100 * result.data_wait_fraction:.1f}% of the time\nrun folder: {out}"
    )
    return 0


def _experiment_config(args: argparse.Namespace) -> Any:
    """``--config``, then ``--plan``'s patch, batch, depth and spacing, then ``--set``.

    ``--plan auto`` plans the config's dataset here first, as ``segmenter plan`` does, into
    ``plans/NAME/`` (a fingerprint already there is reused), with the width timed for
    ``plan.minutes`` or else ``train.max_minutes``.
    """
    from segmenter import config as config_mod

    cfg = config_mod.load_config(args.config)
    plan = getattr(args, "plan", None)
    if plan == AUTO_PLAN:
        from segmenter.data.layout import load_dataset
        from segmenter.data.splits import resolve_dataset
        from segmenter.nn import distributed
        from segmenter.planning import planner

        if distributed.from_environment(os.environ).active:  # each rank would time its own
            raise InputError(
                "--plan auto is not for a torchrun run (each rank would plan and time its "
                "own network): run segmenter plan DATASET first, then --plan plans/NAME/plan.json"
            )

        asked = config_mod.apply_overrides(cfg, args.set)
        if asked.plan.minutes is None and asked.train.max_minutes is not None:
            asked = config_mod.apply_values(asked, {"plan.minutes": asked.train.max_minutes})
        dataset = load_dataset(resolve_dataset(asked))
        made = _plan_dataset(asked, dataset, Path("plans") / dataset.name, reuse_fingerprint=True)
        cfg = config_mod.apply_values(cfg, planner.dataset_plan_values(made))
    elif plan:
        from segmenter.planning import planner

        cfg = config_mod.apply_values(
            cfg, planner.dataset_plan_values(planner.read_dataset_plan(plan))
        )
    return config_mod.apply_overrides(cfg, args.set)


#: ``--plan auto``: plan the dataset now instead of reading a plan.json.
AUTO_PLAN = "auto"


def _add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable ``--set KEY=VALUE`` config override."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _default_run_dir(config_path: str | None, fold: int | str) -> Path:
    from segmenter.data.splits import fold_dir

    stem = Path(config_path).stem if config_path else "run"
    return fold_dir(Path("runs") / stem, fold)


def _case_report(desc: str) -> tuple[Callable[[Iterable[T], int], Iterable[T]], Any]:
    """A ``progress(iterable, total)`` bar over the cases to predict, and the ``on_case``
    callback that prints each written case's line (above the bar) as it comes and shows its
    seconds in the bar's postfix."""
    from tqdm.auto import tqdm

    bars: list[Any] = []

    def wrap(iterable: Iterable[T], total: int) -> Iterable[T]:
        bars.append(tqdm(iterable, total=total, desc=desc, unit="case", file=sys.stderr,
                         leave=False))  # fmt: skip
        return bars[-1]

    def report(r: Any) -> None:
        if r.skipped:
            return  # logged by predict
        if bars:
            bars[-1].set_postfix_str(f"last {r.seconds:.1f} s", refresh=False)
        line = f"{r.case_id}: {r.seconds:.1f} s, {r.n_lesion_voxels} lesion voxels -> {r.mask_path}"
        tqdm.write(line, file=sys.stdout)

    return wrap, report


def _cmd_predict(args: argparse.Namespace) -> int:
    from segmenter.inference import predict, predictor

    predictors = predictor.load_predictors(args.model, device=args.device)
    options = predict.PredictOptions(
        tta=False if args.no_tta or args.tta == "none" else (True if args.tta else None),
        mirroring=args.tta if args.tta in ("all", "single") else None,
        overlap=args.overlap,
        threshold=args.threshold,
        min_lesion_mm3=args.min_lesion_mm3,
        save_probabilities=args.save_probabilities,
    )
    progress, on_case = _case_report("predict")
    results = predict.predict_all(
        predictors, args.input, args.output, options, progress=progress, resume=args.resume,
        on_case=on_case,
    )  # fmt: skip
    made = [r for r in results if not r.skipped]
    skipped = f", {len(results) - len(made)} skipped (finished before)" if args.resume else ""
    mean = sum(r.seconds for r in made) / len(made) if made else 0.0
    models = f"{len(predictors)} models" if len(predictors) > 1 else "1 model"
    print(
        f"{len(made)} case(s) predicted{skipped}, {mean:.1f} s per case on "
        f"{predictors[0].device} ({models})"
    )
    return 0


def _cmd_crossval(args: argparse.Namespace) -> int:
    from segmenter.evaluation.report import format_metric
    from segmenter.workflows import crossval

    cfg = _experiment_config(args)
    result = crossval.run_crossval(
        cfg, args.out, folds=args.folds, progress=True, devices=args.devices
    )
    post = result.postprocessing
    print(f"folds {result.folds} (trained now: {result.trained or 'none'}); {post['tuned_on']}")
    print(f"{'post-processing':<34}{'F1':>7}{'recall':>8}{'prec':>7}{'Dice':>7}")
    for key in ("before", "after"):
        row = post[key]
        label = f"{key}: threshold {row['threshold']:.2f}, min {row['min_lesion_mm3']:g} mm3"
        print(
            f"{label:<34}"
            + "".join(
                f"{format_metric(row[k], missing='nan'):>{w}}"
                for k, w in (("f1", 7), ("recall", 8), ("precision", 7), ("dice", 7))
            )
        )
    print(f"wrote {Path(args.out) / 'summary.json'} (out-of-fold, after) and postprocessing.json")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from segmenter import config as config_mod
    from segmenter.evaluation.report import format_metric
    from segmenter.workflows.compare import compare, load_variants
    from segmenter.workflows.compare_stats import statistics_lines, variant_statistics

    base = config_mod.load_config(args.config, args.set)
    variants = load_variants(args.variants, base)
    results = compare(
        base, variants, args.out, minutes=args.minutes, folds=args.folds, seeds=args.seeds,
        reference=args.reference, devices=args.devices, progress=True,
        variant_progress=_progress("compare", unit="run"),
    )  # fmt: skip
    print(
        f"{'variant':<16} {'replicate':<14} {'held-out':>8} {'Dice':>6} {'recall':>7} "
        f"{'prec':>6} {'F1':>6}  run"
    )
    for r in results:
        fg, pooled = r.summary["foreground_mean"], r.summary["lesion"]["pooled"]
        dice, recall, prec, f1 = (
            format_metric(v, missing="nan")
            for v in (fg["Dice"], pooled["recall"], pooled["precision"], pooled["f1"])
        )
        print(
            f"{r.variant.name:<16} {r.replicate.name:<14} {r.summary['n_cases']:>8} {dice:>6} "
            f"{recall:>7} {prec:>6} {f1:>6}  "
            f"{'trained' if r.trained_now else 'skipped (finished before)'}"
        )
    from segmenter.workflows.compare import comparison_rows

    reference = args.reference or variants[0].name
    for line in statistics_lines(variant_statistics(comparison_rows(results), reference)):
        print(line)
    out = Path(args.out)
    print(f"wrote {out / 'comparison.csv'} and {out / 'statistics.csv'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from segmenter.workflows import demo

    demo.run_demo(Path(args.out), minutes=args.minutes, seed=args.seed)
    return 0


def _fold(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"fold must be >= 0, got {value}")
    return value


def _number(
    kind: type, *, low: float | None = None, high: float | None = None, strict: bool = False
) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) within ``[low, high]`` (open with ``strict``)."""
    lo_word = ">" if strict else ">="
    name = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        too_low = low is not None and (value <= low if strict else value < low)
        too_high = high is not None and (value >= high if strict else value > high)
        if too_low or too_high:
            bounds = [f"{lo_word} {low:g}"] if low is not None else []
            bounds += [f"{'<' if strict else '<='} {high:g}"] if high is not None else []
            raise argparse.ArgumentTypeError(f"expected {name} {' and '.join(bounds)}, got {value}")
        return value

    return parse


_probability = _number(float, low=0.0, high=1.0, strict=True)
_overlap = _number(float, low=0.0, high=0.99)
_non_negative_float = _number(float, low=0.0)
_positive_float = _number(float, low=0.0, strict=True)
_positive_int = _number(int, low=1)


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

    p = sub.add_parser("plan", help="dataset fingerprint and plan (spacing, patch, depth)")
    p.add_argument("dataset", help="nnU-Net raw dataset folder (DatasetXXX_Name)")
    p.add_argument("--config", help="YAML config whose plan section sets the budget")
    p.add_argument("--out", help="where fingerprint.json and plan.json go (default plans/NAME)")
    p.add_argument(
        "--minutes", type=_positive_float,
        help="training budget (plan.minutes): time each width here and choose base_filters",
    )  # fmt: skip
    _add_set(p, "override a config key, e.g. plan.budget=gpu (repeatable)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("evaluate", help="voxel and lesion-level metrics of predictions")
    p.add_argument("--pred", required=True, help="folder of predicted masks")
    p.add_argument("--ref", required=True, help="folder of reference masks (same case ids)")
    p.add_argument(
        "--preset",
        default="isles22",
        choices=PRESET_NAMES,
        help="lesion matching rule (default isles22: any overlap, 26-connectivity)",
    )
    p.add_argument("--out", help="where summary.json and lesions.csv go (default: --pred)")
    p.add_argument("--workers", type=_positive_int, default=2, help="cases in parallel")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train", help="train a 3D U-Net (one fold) into a run folder")
    p.add_argument("--config", help="YAML experiment config (names only what it changes)")
    _add_set(p, "override a config key, e.g. --set train.epochs=50 (repeatable)")
    p.add_argument(
        "--plan",
        help="plan.json from segmenter plan: its patch, batch, depth, target spacing, width; "
        "'auto': plan the config's dataset now (plans/NAME/)",
    )
    p.add_argument("--out", help="run folder (default: runs/<config name>/fold_<K>)")
    p.add_argument("--fold", type=_fold, default=0, help="cross-validation fold or 'all'")
    p.add_argument("--resume", action="store_true", help="continue --out from last.pt")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="segment new scans with a trained run")
    p.add_argument(
        "--model", required=True, nargs="+",
        help="run folder(s) (checkpoints/best.pt) or a crossval folder (all its folds); "
        "several: their probabilities are averaged",
    )  # fmt: skip
    p.add_argument(
        "--input", required=True, nargs="+",
        help="one file per channel in channel order, or a folder of CASE_XXXX files",
    )  # fmt: skip
    p.add_argument("--output", required=True, help="mask file (one case) or folder")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument(
        "--tta", choices=("all", "single", "none"),
        help="mirroring test-time augmentation: all 8 flips, single (no flip and the 3 "
        "single-axis flips: half the time) or none (default: the run's, all)",
    )  # fmt: skip
    p.add_argument("--no-tta", action="store_true", help="the same as --tta none")
    p.add_argument(
        "--overlap", type=_overlap,
        help="sliding-window overlap in [0, 1) (default: the run's, 0.5 as nnU-Net; 0.25 is "
        "MONAI's default: fewer windows, faster)",
    )  # fmt: skip
    p.add_argument(
        "--threshold", type=_probability, help="probability threshold (default: the run's)"
    )
    p.add_argument(
        "--min-lesion-mm3", type=_non_negative_float, help="drop smaller predicted lesions (mm3)"
    )
    p.add_argument(
        "--save-probabilities", action="store_true",
        help="also write float32 probability maps (OUTPUT/probabilities/)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="skip the cases whose mask (and probability map) OUTPUT already holds",
    )  # fmt: skip
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("crossval", help="all folds, out-of-fold tuning and evaluation")
    p.add_argument("--config", required=True, help="YAML config (train.n_folds sets the split)")
    p.add_argument("--out", required=True, help="cross-validation folder (finished folds kept)")
    p.add_argument(
        "--plan",
        help="plan.json from segmenter plan: its patch, batch, depth, target spacing, width; "
        "'auto': plan the config's dataset now (plans/NAME/)",
    )
    p.add_argument("--folds", type=int, nargs="+", help="fold numbers to run (default: every fold)")
    p.add_argument(
        "--devices", nargs="+",
        help="train folds in parallel, one per device: CUDA indices (0 1 ...) or cpu (repeatable)",
    )  # fmt: skip
    _add_set(p, "override a config key (repeatable)")
    p.set_defaults(func=_cmd_crossval)

    p = sub.add_parser("compare", help="train and evaluate several variants of a config")
    p.add_argument("--config", required=True, help="base YAML config (data, model, split...)")
    p.add_argument("--variants", required=True, help="YAML file: variants: {name: {key: value}}")
    p.add_argument("--out", required=True, help="comparison folder (finished variants are kept)")
    p.add_argument(
        "--minutes", type=_positive_float, help="training budget per run (train.max_minutes)"
    )
    p.add_argument(
        "--folds", type=int, nargs="+", help="folds to train and score each variant on (default 0)"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+",
        help="training seeds per fold (default train.seed; the split stays the base config's)",
    )  # fmt: skip
    p.add_argument(
        "--reference", help="variant the others are compared with case by case (default: first)"
    )
    p.add_argument(
        "--devices", nargs="+",
        help="train the runs in parallel first, one per device: CUDA indices (0 1 ...) or cpu",
    )  # fmt: skip
    _add_set(p, "override a key of the base config (repeatable)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="synthetic data -> train -> predict -> evaluate")
    p.add_argument("--out", default="segmenter_demo", help="output folder (default segmenter_demo)")
    p.add_argument(
        "--minutes", type=_positive_float, default=5.0, help="whole demo budget (default 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_cmd_demo)
    return parser


def _clear_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that its line starts on a clean line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        bar.close()


#: System failures reported in one line (exit 1) instead of a traceback, and what to do.
_SYSTEM_ERRNOS = {
    errno.ENOSPC: "free some space and rerun (outputs are written atomically: none was cut short)",
    errno.EDQUOT: "the disk quota is full: free some space and rerun (no output was cut short)",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EACCES: "permission denied: choose a folder you can write to",
}


def _resume_hint(args: argparse.Namespace, argv: Sequence[str], folder: Path) -> str:
    """How to continue a run stopped by a signal: ``train --resume`` for ``train``; rerunning
    the command for ``crossval`` and ``compare``, which keep what they finished."""
    if args.command == "train":
        return f"; resume with: segmenter train --resume --out {shlex.quote(str(folder))}"
    if args.command in ("crossval", "compare"):
        return f"; resume with: segmenter {shlex.join(argv)}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or usage, 1 internal error or a
    system failure such as a full disk, 130 interrupted by SIGINT, 143 stopped by SIGTERM:
    ``128 + signal``, as shells report)."""
    return _run(argv, _returned)


def _returned(code: int) -> int:
    return code


def _exit_now(code: int) -> NoReturn:
    """End this process with ``code`` once its streams are flushed, skipping the teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: Sequence[str] | None, done: Callable[[int], int]) -> int:
    """:func:`main`, handing its exit code to ``done`` where it is known: inside the handler
    of an error, before the exception (and the run it stopped) is released."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors exit 2
        return done(int(exc.code) if isinstance(exc.code, int) else 2)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return done(int(args.func(args)))
    except InputError as exc:
        _clear_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return done(2)
    except (PeerLost, TrainingFailed) as exc:  # a lost rank; a training process that failed
        _clear_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return done(1)
    except Interrupted as exc:  # a stop signal, honoured at a safe point with the progress saved
        print(f"{exc}{_resume_hint(args, argv, exc.folder)}", file=sys.stderr)
        return done(128 + exc.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return done(130)
    except OSError as exc:
        if exc.errno not in _SYSTEM_ERRNOS:
            log.exception("internal error (please report with the command line above)")
            return done(1)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror}; {_SYSTEM_ERRNOS[exc.errno]}", file=sys.stderr)
        return done(1)
    except Exception:
        log.exception("internal error (please report with the command line above)")
        return done(1)


def entry() -> None:
    """The console script and ``python -m segmenter``: :func:`main`'s exit code.

    A rank of a data-parallel run (torchrun's ``WORLD_SIZE`` over 1) ends with ``os._exit``
    as soon as its exit code is known and its streams are flushed, still inside the error
    handler: every file is written (atomically, by rank 0) by then. Releasing the stopped
    run (its DDP model and gloo process group, held by the exception's frames) after a peer
    had exited was seen to hang a rank for minutes after it printed its stop line.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        _exit_now(_run(None, _exit_now))
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
