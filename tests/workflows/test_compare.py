"""Tests for segmenter.workflows.compare and `segmenter compare`: variants of one base config,
trained, predicted and scored on the same cases."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny import load_script

from segmenter.cli import main
from segmenter.config import load_config
from segmenter.errors import InputError
from segmenter.workflows.compare import Replicate, load_variants, replicates

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def setup(phantoms: Path, tiny_config: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path]:
    base = tiny_config(tmp_path / "base.yaml", phantoms, {"inference.tta": False})
    variants = tmp_path / "variants.yaml"
    variants.write_text(
        "variants:\n  dice: {loss.name: dice}\n  bce: {loss.name: focal, loss.gamma: 0.0}\n"
    )
    return base, variants


def test_compare_two_variants_then_rerun_skips_both(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, variants = setup
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(base), "--variants", str(variants), "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(" trained") == 2
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["variant"] for r in rows}) == ["bce", "dice"]
    assert len(rows) == 4  # 2 variants x 2 held-out test cases
    assert {r["case_id"] for r in rows} == {"phantom_test_000", "phantom_test_001"}
    dice_cfg = load_config(out / "variants" / "dice" / "fold0_seed0" / "config.yaml")
    bce_cfg = load_config(out / "variants" / "bce" / "fold0_seed0" / "config.yaml")
    assert (dice_cfg.loss.name, bce_cfg.loss.name, bce_cfg.loss.gamma) == ("dice", "focal", 0.0)
    assert dice_cfg.train.seed == bce_cfg.train.seed and dice_cfg.data == bce_cfg.data
    summary = out / "variants" / "dice" / "fold0_seed0" / "evaluation" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("skipped (finished before)") == 2
    assert summary.stat().st_mtime_ns == stamp
    for png in (
        "recall_by_size",
        "dice_f1_per_variant",
        "froc",
        "training_curves",
        "slice_overlay",
    ):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    froc = json.loads((out / "variants" / "dice" / "fold0_seed0" / "froc.json").read_text())
    assert len(froc) == 19 and all(0.0 <= p["recall"] <= 1.0 for p in froc)
    recalls = [p["recall"] for p in froc]  # thresholds increase: recall cannot rise
    assert all(a >= b for a, b in zip(recalls, recalls[1:], strict=False))
    with open(out / "comparison.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    # scripts/postprocess_table.py re-scores the kept probability maps at other minimum sizes
    table = load_script("postprocess_table")
    assert table.main([str(out), "--sizes", "0", "1e9", "--threshold", "0.5"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    expected = [(v, size) for v in ("bce", "dice") for size in ("0", "1e+09")]
    assert [(r[0], r[1]) for r in lines] == expected
    assert all(r[2] == "0.50" and r[-1] == "2" for r in lines)  # threshold, cases
    assert all(r[4] == "0.000" and r[7] == "0.00" for r in lines if r[1] == "1e+09")  # all removed
    assert table.main([str(tmp_path)]) == 2  # not a compare folder
    assert table.main([str(out), "--sizes", "0", "--threshold", "0.5", "--reference", "dice"]) == 0
    paired = capsys.readouterr().out
    assert "paired with dice, min 0 mm3 (per case):" in paired and "over 2" in paired


def test_variants_are_checked_before_training(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = setup
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  typo: {loss.gamme: 2}\n")
    with pytest.raises(InputError, match=r"variant 'typo': unknown config key 'loss.gamme'"):
        load_variants(bad, load_config(base))
    bad.write_text("variants:\n  wrong: {loss.gamma: high}\n")
    with pytest.raises(InputError, match=r"variant 'wrong': loss.gamma: expected a number"):
        load_variants(bad, load_config(base))
    bad.write_text("- not a mapping\n")
    with pytest.raises(InputError, match="expected a mapping 'variants:"):
        load_variants(bad, load_config(base))


def test_shipped_loss_comparison_variants_are_valid() -> None:
    variants = load_variants(CONFIGS / "loss_comparison.yaml", load_config(None, []))
    names = [v.name for v in variants]
    assert {"dice", "bce", "focal_g2_a25", "focal_dice_10_1", "dice_ce"} <= set(names)
    assert len(names) == 11


def test_without_a_test_set_each_fold_scores_its_validation_cases(
    phantoms: Path,
    tiny_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No imagesTs: each replicate is predicted (with probabilities) and scored on the validation
    # cases of its fold, the same cases for every variant; FROC and the overlay come from them,
    # and the statistics pair the variants over the (fold, case) pairs.
    no_test = shutil.ignore_patterns("imagesTs", "labelsTs")
    dataset = shutil.copytree(phantoms, tmp_path / phantoms.name, ignore=no_test)
    base = tiny_config(tmp_path / "base.yaml", dataset, {"inference.tta": False})
    variants = tmp_path / "variants.yaml"
    variants.write_text("variants:\n  dice: {loss.name: dice}\n  focal: {loss.name: focal}\n")
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(base), "--variants", str(variants), "--out", str(out)]
    assert main([*argv, "--folds", "0", "2", "--reference", "focal"]) == 0
    printed = capsys.readouterr().out
    run = out / "variants" / "dice" / "fold0_seed0" / "run"
    splits = json.loads((run / "splits.json").read_text())
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for fold in (0, 2):
        val = sorted(splits[fold]["val"])
        for name in ("dice", "focal"):
            mine = [r for r in rows if r["variant"] == name and r["fold"] == str(fold)]
            assert sorted(r["case_id"] for r in mine) == val
            assert {r["seed"] for r in mine} == {"0"}
            folder = out / "variants" / name / f"fold{fold}_seed0"
            summary = json.loads((folder / "evaluation" / "summary.json").read_text())
            assert summary["held_out"] == f"validation cases of fold {fold}"
            assert summary["replicate"] == {"fold": fold, "seed": 0}
            assert sorted(p.name for p in (folder / "reference").iterdir()) == [
                f"{c}.nii.gz" for c in val
            ]
            assert len(json.loads((folder / "froc.json").read_text())) == 19
    assert (out / "slice_overlay.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "statistics.csv", newline="") as f:
        stats = {(r["variant"], r["metric"]): r for r in csv.DictReader(f)}
    n_pairs = len(splits[0]["val"]) + len(splits[2]["val"])
    assert stats["dice", "dice"]["reference"] == "focal"
    assert stats["dice", "dice"]["replicates"] == "2"
    assert stats["dice", "dice"]["pairs"] == str(n_pairs)
    assert stats["focal", "dice"]["pairs"] == ""  # the reference itself
    assert "(reference, focal)" in printed and f"over {n_pairs}" in printed


def test_seeds_share_the_split_and_rerun_skips_finished_replicates(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two seeds of fold 1: the training seed changes, the split (split_seed) does not; the
    # held-out test cases pair every (seed, case) across the variants.
    base, variants = setup
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(base), "--variants", str(variants), "--out", str(out)]
    argv += ["--folds", "1", "--seeds", "3", "4"]
    assert main(argv) == 0
    assert capsys.readouterr().out.count(" trained") == 4
    configs = {
        (name, seed): load_config(out / "variants" / name / f"fold1_seed{seed}" / "config.yaml")
        for name in ("dice", "bce")
        for seed in (3, 4)
    }
    assert {(c.train.seed, c.train.split_seed) for c in configs.values()} == {(3, 0), (4, 0)}
    split_files = {
        (out / "variants" / name / f"fold1_seed{seed}" / "run" / "splits.json").read_text()
        for name, seed in configs
    }
    assert len(split_files) == 1
    with open(out / "statistics.csv", newline="") as f:
        stats = {(r["variant"], r["metric"]): r for r in csv.DictReader(f)}
    assert stats["bce", "lesion_f1"]["pairs"] in {"0", "1", "2", "3", "4"}
    assert (
        stats["bce", "dice"]["replicates"] == "2" and stats["dice", "dice"]["reference"] == "dice"
    )
    assert main(argv) == 0
    assert capsys.readouterr().out.count("skipped (finished before)") == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--folds", "3"], r"folds must be in 0\.\.2"),
        (["--folds", "0", "0"], "a fold is given twice"),
        (["--seeds", "1", "1"], "a seed is given twice"),
        (["--reference", "nope"], "reference variant 'nope' is not one of"),
    ],
)
def test_bad_folds_seeds_or_reference_exit_2_before_training(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    base, variants = setup
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(base), "--variants", str(variants), "--out", str(out)]
    assert main([*argv, *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "variants").exists()


def test_seeds_are_refused_when_a_variant_sets_its_own_seed(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    base, _ = setup
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text("variants:\n  a: {}\n  b: {train.seed: 7}\n")
    cfg = load_config(base)
    found = load_variants(seeded, cfg)
    with pytest.raises(InputError, match=r"variant\(s\) \['b'\] set train.seed"):
        replicates(cfg, found, None, [1, 2])
    # without --seeds each variant keeps its own seed
    assert replicates(cfg, found, [0, 1], None) == [Replicate(0, None), Replicate(1, None)]


def test_devices_train_the_replicates_in_parallel_with_the_sequential_result(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    base, variants = setup
    argv = ["compare", "--config", str(base), "--variants", str(variants)]
    assert main([*argv, "--out", str(tmp_path / "seq")]) == 0
    assert main([*argv, "--out", str(tmp_path / "par"), "--devices", "cpu", "cpu"]) == 0
    assert capsys.readouterr().out.count(" trained") == 4
    for name in ("dice", "bce"):
        seq = tmp_path / "seq" / "variants" / name / "fold0_seed0"
        par = tmp_path / "par" / "variants" / name / "fold0_seed0"
        a = torch.load(seq / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
        b = torch.load(par / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)  # train.threads fixed: bit for bit
        assert (par / "run.console.log").is_file()
        assert json.loads((par / "trained.json").read_text())["steps"] == 2
        summary = json.loads((par / "evaluation" / "summary.json").read_text())
        assert summary["training"]["steps"] == 2
    with open(tmp_path / "seq" / "comparison.csv", newline="") as f:
        seq_rows = [{k: v for k, v in r.items() if k != "train_minutes"} for r in csv.DictReader(f)]
    with open(tmp_path / "par" / "comparison.csv", newline="") as f:
        par_rows = [{k: v for k, v in r.items() if k != "train_minutes"} for r in csv.DictReader(f)]
    assert par_rows == seq_rows
