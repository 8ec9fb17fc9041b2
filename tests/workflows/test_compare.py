"""Tests for segmenter.workflows.compare and `segmenter compare`: variants of one base config,
trained, predicted and scored on the same cases."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from segmenter.cli import main
from segmenter.config import load_config
from segmenter.errors import InputError
from segmenter.workflows.compare import load_variants

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
    dice_cfg = load_config(out / "variants" / "dice" / "config.yaml")
    bce_cfg = load_config(out / "variants" / "bce" / "config.yaml")
    assert (dice_cfg.loss.name, bce_cfg.loss.name, bce_cfg.loss.gamma) == ("dice", "focal", 0.0)
    assert dice_cfg.train.seed == bce_cfg.train.seed and dice_cfg.data == bce_cfg.data
    summary = out / "variants" / "dice" / "evaluation" / "summary.json"
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
    froc = json.loads((out / "variants" / "dice" / "froc.json").read_text())
    assert len(froc) == 19 and all(0.0 <= p["recall"] <= 1.0 for p in froc)
    recalls = [p["recall"] for p in froc]  # thresholds increase: recall cannot rise
    assert all(a >= b for a, b in zip(recalls, recalls[1:], strict=False))
    with open(out / "comparison.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


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


def test_without_a_test_set_the_fold_validation_cases_are_scored(
    phantoms: Path, tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # No imagesTs: every variant is predicted (with probabilities) and scored on the validation
    # cases of fold 0, the same cases for every variant; FROC and the overlay come from them.
    no_test = shutil.ignore_patterns("imagesTs", "labelsTs")
    dataset = shutil.copytree(phantoms, tmp_path / phantoms.name, ignore=no_test)
    base = tiny_config(tmp_path / "base.yaml", dataset, {"inference.tta": False})
    variants = tmp_path / "variants.yaml"
    variants.write_text("variants:\n  dice: {loss.name: dice}\n  focal: {loss.name: focal}\n")
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(base), "--variants", str(variants), "--out", str(out)]
    assert main(argv) == 0
    splits = json.loads((out / "variants" / "dice" / "run" / "splits.json").read_text())
    val = sorted(splits[0]["val"])
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in ("dice", "focal"):
        assert sorted(r["case_id"] for r in rows if r["variant"] == name) == val
        folder = out / "variants" / name
        summary = json.loads((folder / "evaluation" / "summary.json").read_text())
        assert summary["held_out"] == "validation cases of fold 0"
        assert sorted(p.name for p in (folder / "reference").iterdir()) == [
            f"{c}.nii.gz" for c in val
        ]
        assert len(json.loads((folder / "froc.json").read_text())) == 19
    assert (out / "slice_overlay.png").read_bytes()[:4] == b"\x89PNG"
