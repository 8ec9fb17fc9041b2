"""Tests for segmenter.training.loop: ``fit`` and ``segmenter train`` end to end, resume, the run
folder, and predictions from a trained run in the scan's own geometry."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segmenter.cli import main
from segmenter.config import load_config
from segmenter.data.layout import load_dataset
from segmenter.data.splits import label_burdens, make_splits
from segmenter.errors import InputError
from segmenter.io import read_image, write_image
from segmenter.training.loop import _split_cases, fit


def test_train_predict_evaluate_in_process(
    phantoms: Path, tiny_config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--config", str(tiny_config_file), "--set", "train.epochs=2",
            "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    for name in ("config.yaml", "plan.json", "splits.json", "metrics.csv", "train.log",
                 "summary.json", "lesions.csv", "training_curves.png"):  # fmt: skip
        assert (run / name).is_file(), name
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert {"model", "optimizer", "config", "plan", "epoch", "step"} <= set(state)
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,step,lr,train_loss,val_dice")
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits) == 3 and all(set(s) == {"train", "val"} for s in splits)
    pred = tmp_path / "pred"
    argv = ["predict", "--model", str(run), "--input", str(phantoms / "imagesTs"),
            "--output", str(pred), "--no-tta", "--save-probabilities"]  # fmt: skip
    assert main(argv) == 0
    masks = sorted(pred.glob("*.nii.gz"))
    assert [m.name for m in masks] == ["phantom_test_000.nii.gz", "phantom_test_001.nii.gz"]
    prob = read_image(pred / "probabilities" / "phantom_test_000.nii.gz")
    assert prob.array.dtype == np.float32 and 0.0 <= prob.array.min() <= prob.array.max() <= 1.0
    assert read_image(masks[0]).array.dtype == np.uint8
    assert main(["evaluate", "--pred", str(pred), "--ref", str(phantoms / "labelsTs")]) == 0
    assert "pooled" in capsys.readouterr().out


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    tiny_config_file: Path, tmp_path: Path
) -> None:
    cfg = load_config(tiny_config_file, ["train.epochs=3", "train.val_every=2"])
    fit(cfg, tmp_path / "straight", progress=False)
    part = tmp_path / "resumed"
    fit(cfg, part, progress=False, should_stop=lambda epoch: epoch == 1)
    interrupted = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert interrupted["epoch"] == 1 and interrupted["step"] == 2
    assert main(["train", "--resume", "--out", str(part)]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 6)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    rows = (part / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # header + the three epochs, across the interruption


def test_dropout_masks_follow_the_seed_the_rank_and_the_step_alone(
    tiny_config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # whatever else draws from torch's global generator between the steps, the masks stay
    # (so a resumed rank, or one of several, draws what it would have drawn)
    from segmenter.training import loop

    cfg = load_config(tiny_config_file, ["train.epochs=2", "model.dropout=0.3"])
    fit(cfg, tmp_path / "plain", progress=False)
    seeded: list[tuple[int, int, int]] = []
    original_seed, original_step = loop.seed_step, loop.TrainStep.__call__

    def recording_seed(seed: int, rank: int, step: int) -> None:
        seeded.append((seed, rank, step))
        original_seed(seed, rank, step)

    def disturbed_step(self: loop.TrainStep, batch: dict[str, torch.Tensor]) -> float:
        loss = original_step(self, batch)
        torch.rand(7)  # were the next masks drawn from the running global state, they would shift
        return loss

    monkeypatch.setattr(loop, "seed_step", recording_seed)
    monkeypatch.setattr(loop.TrainStep, "__call__", disturbed_step)
    fit(cfg, tmp_path / "disturbed", progress=False)
    assert seeded == [(cfg.train.seed, 0, k) for k in range(len(seeded))] and len(seeded) == 4
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "disturbed" / "checkpoints" / "last.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)


def test_the_split_follows_the_stored_labels_not_the_preprocessed_ones(phantoms: Path) -> None:
    cfg = load_config(Path("configs/default.yaml"), [f"data.dataset={phantoms}"])
    dataset = load_dataset(phantoms)
    raw = dict(
        zip([c.case_id for c in dataset.training], label_burdens(dataset.training), strict=True)
    )
    ids = sorted(raw)
    # preprocessed labels whose burdens run against the stored ones (another spacing or crop)
    order = sorted(ids, key=raw.__getitem__)
    fake = [
        SimpleNamespace(case_id=i, label=np.arange(10) < len(ids) - order.index(i)) for i in ids
    ]
    splits, _, _ = _split_cases(cfg, dataset, fake, 0)  # type: ignore[arg-type]
    expected = make_splits(
        ids, [raw[i] for i in ids], cfg.train.n_folds, cfg.train.resolved_split_seed
    )
    assert splits == expected


def test_a_resumed_run_keeps_the_split_it_saved(tiny_config_file: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_config_file, ["train.epochs=2", "train.val_every=2"])
    run = tmp_path / "run"
    fit(cfg, run, progress=False, should_stop=lambda epoch: epoch == 1)
    splits = json.loads((run / "splits.json").read_text())
    ids = sorted(splits[0]["train"] + splits[0]["val"])
    edited = [{"train": ids[2:], "val": ids[:2]}] * len(splits)  # not what the code computes
    assert edited[0] != splits[0]
    (run / "splits.json").write_text(json.dumps(edited))
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert json.loads((run / "splits.json").read_text()) == edited
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(c["case_id"] for c in summary["metric_per_case"]) == ids[:2]


def test_resume_needs_a_run_and_a_fresh_run_needs_an_empty_folder(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    run = shutil.copytree(trained_run, tmp_path / "run")
    with pytest.raises(InputError, match="already holds a trained run"):
        fit(load_config(run / "config.yaml"), run, progress=False)


#: An oblique scan with 1.2 x 0.9 x 2.8 mm voxels whose array axes are permuted against RAS.
OBLIQUE = np.array(
    [[0.0, -0.9, 0.3, 40.0], [1.2, 0.0, 0.0, -20.0], [0.0, 0.25, 2.8, 10.0], [0, 0, 0, 1]]
)


def _oblique_scan(folder: Path, shape: tuple[int, int, int], seed: int, margin: int) -> list[Path]:
    """Two channels of noise on :data:`OBLIQUE`, zero within ``margin`` voxels of the border."""
    rng = np.random.default_rng(seed)
    inner = tuple(slice(margin, n - margin) for n in shape)
    paths = []
    for c in range(2):
        vol = np.zeros(shape, np.float32)
        vol[inner] = rng.normal(100, 20, vol[inner].shape)
        paths.append(write_image(folder / f"scan_{c:04d}.nii.gz", vol, OBLIQUE))
    return paths


def test_prediction_keeps_the_geometry_of_an_oblique_anisotropic_input(
    tmp_path: Path, trained_run: Path
) -> None:
    shape = (37, 29, 13)
    paths = _oblique_scan(tmp_path, shape, seed=0, margin=0)
    out = tmp_path / "scan_mask.nii.gz"
    argv = ["predict", "--model", str(trained_run), "--input", *map(str, paths),
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    mask = read_image(out)
    scan = read_image(paths[0])
    assert mask.array.shape == shape
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
    assert set(np.unique(mask.array)) <= {0, 1}


def test_target_spacing_resamples_for_training_and_back_for_prediction(
    tmp_path: Path, tiny_config_file: Path
) -> None:
    # Train at 0.8 mm on 1 mm phantoms; predict an oblique scan of 1.2 x 0.9 x 2.8 mm voxels:
    # the mask comes back on the scan's own grid (resampled there, uncropped).
    run = tmp_path / "run"
    cfg = load_config(tiny_config_file, ["data.target_spacing=[0.8, 0.8, 0.8]"])
    fit(cfg, run, progress=False)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["target_spacing"] == [0.8, 0.8, 0.8]
    shape = (33, 41, 11)
    paths = _oblique_scan(tmp_path, shape, seed=1, margin=1)
    out = tmp_path / "mask.nii.gz"
    argv = ["predict", "--model", str(run), "--input", *map(str, paths), "--output", str(out),
            "--no-tta", "--save-probabilities"]  # fmt: skip
    assert main(argv) == 0
    mask, scan = read_image(out), read_image(paths[0])
    assert mask.array.shape == shape
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
    prob = read_image(tmp_path / "probabilities" / "mask.nii.gz").array
    assert prob.shape == shape and prob[0].max() == 0.0  # outside the nonzero box: 0


def test_predict_bad_inputs_exit_2_and_write_nothing(
    trained_run: Path, phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = phantoms / "imagesTs"
    ch0, ch1 = images / "phantom_test_000_0000.nii.gz", images / "phantom_test_000_0001.nii.gz"
    out = tmp_path / "out"

    def run(*inputs: Path, model: Path = trained_run) -> str:
        argv = ["predict", "--model", str(model), "--input", *map(str, inputs),
                "--output", str(out / "m.nii.gz")]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1
        assert not out.exists() or not any(out.rglob("*.nii.gz"))
        return err

    assert "expects 2 channel(s) (FLAIR, T1) but 1 input" in run(ch0)
    small = write_image(tmp_path / "small_0001.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    assert "differs from channel 0" in run(ch0, small)
    corrupt = tmp_path / "corrupt_0001.nii.gz"
    corrupt.write_bytes(ch1.read_bytes()[:200])
    assert "cannot read image" in run(ch0, corrupt)
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert "no checkpoint" in run(ch0, ch1, model=empty_run)
    assert "input not found" in run(ch0, tmp_path / "missing_0001.nii.gz")


def test_bad_dataset_or_fold_fails_before_anything_is_written(
    tiny_config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--config", str(tiny_config_file), "--out", str(run)]
    assert main([*argv, "--set", "data.dataset=/nonexistent/Dataset001_X"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*argv, "--fold", "3"]) == 2  # n_folds is 3 in the tiny config
    assert "--fold 3 out of range 0..2" in capsys.readouterr().err
    assert main([*argv, "--set", "train.n_folds=7"]) == 2
    assert "fewer than train.n_folds=7" in capsys.readouterr().err
    assert not run.exists()


def test_unknown_config_key_exit_2(
    tiny_config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--config", str(tiny_config_file), "--set", "train.epocs=3",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    assert "unknown config key 'train.epocs'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tuned_threshold_is_stored_in_the_run(trained_run: Path) -> None:
    plan = json.loads((trained_run / "plan.json").read_text())
    state = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    assert "pooled lesion F1" in plan["threshold_tuning"]["criterion"]
    assert state["plan"]["threshold"] == plan["threshold"]
    assert len(plan["threshold_tuning"]["rows"]) == 17


def reject_constant(name: str) -> float:
    """``parse_constant`` for strict JSON: NaN and the infinities are no JSON values."""
    raise ValueError(f"not strict JSON: {name}")


def test_the_run_plan_is_strict_json(trained_run: Path) -> None:
    json.loads((trained_run / "plan.json").read_text(), parse_constant=reject_constant)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fold_all_trains_without_validation_and_keeps_the_last_checkpoint(
    tiny_config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # --fold all holds no case out: by default (train.validation auto) no validation runs,
    # best.pt is last.pt and predict keeps inference.threshold.
    caplog.set_level(logging.INFO, logger="segmenter")
    run = tmp_path / "all"
    argv = ["train", "--config", str(tiny_config_file), "--fold", "all", "--out", str(run),
            "--set", "train.epochs=2", "--set", "inference.threshold=0.4"]  # fmt: skip
    assert main(argv) == 0
    assert "no validation: best.pt is the last checkpoint" in capsys.readouterr().out
    rows = _csv_rows(run / "metrics.csv")
    assert len(rows) == 2 and all(r["val_dice"] == "" and r["val_lesion_f1"] == "" for r in rows)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert best["step"] == last["step"] == 4
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    plan = json.loads((run / "plan.json").read_text())
    assert plan["threshold"] == 0.4 and "threshold_tuning" not in plan
    assert not (run / "summary.json").exists()
    assert "validation on none" in caplog.text


def test_validation_on_the_training_cases_when_asked(
    tiny_config_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="segmenter")
    run = tmp_path / "all_training"
    argv = ["train", "--config", str(tiny_config_file), "--fold", "all", "--out", str(run),
            "--set", "train.validation=training"]  # fmt: skip
    assert main(argv) == 0
    assert _csv_rows(run / "metrics.csv")[0]["val_dice"] != ""
    assert "threshold_tuning" in json.loads((run / "plan.json").read_text())
    assert "validation on 6 training case(s)" in caplog.text  # every phantom case


def test_no_validation_in_a_fold_and_held_out_refused_for_fold_all(
    tiny_config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "fold0_none"
    argv = ["train", "--config", str(tiny_config_file), "--out", str(run),
            "--set", "train.validation=none"]  # fmt: skip
    assert main(argv) == 0
    assert _csv_rows(run / "metrics.csv")[0]["val_dice"] == ""
    refused = tmp_path / "refused"
    argv = ["train", "--config", str(tiny_config_file), "--fold", "all", "--out", str(refused),
            "--set", "train.validation=held_out"]  # fmt: skip
    assert main(argv) == 2
    assert "train.validation: held_out needs a fold number" in capsys.readouterr().err
    assert not refused.exists()


def test_resuming_a_validating_run_without_validation_keeps_the_last_checkpoint(
    tiny_config_file: Path, tmp_path: Path
) -> None:
    # An older --fold all run validated on its training cases and saved a best.pt; resumed
    # under validation none, best.pt must become the last checkpoint, not stay the old one.
    run = tmp_path / "all"
    base = ["train", "--config", str(tiny_config_file), "--fold", "all", "--out", str(run)]
    assert main([*base, "--set", "train.validation=training"]) == 0
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["step"] == 2
    saved = run / "config.yaml"  # as an older version wrote it: no train.validation key
    saved.write_text(saved.read_text().replace("  validation: training\n", ""))
    config = tmp_path / "old.yaml"
    config.write_text(saved.read_text())
    again = ["train", "--config", str(config), "--fold", "all", "--out", str(run), "--resume"]
    assert main([*again, "--set", "train.epochs=2"]) == 0
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == 4
