"""Tests for `segmenter crossval` and ensembles in `segmenter predict`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_faults import fm

from segmenter.cli import main
from segmenter.data.layout import load_dataset
from segmenter.evaluation.tuning import MIN_SIZES_MM3
from segmenter.inference.predict import PredictOptions, predict_probability
from segmenter.inference.predictor import load_predictor, load_predictors, model_runs
from segmenter.io import read_image


@pytest.fixture(scope="module")
def crossval_run(
    phantoms: Path, tiny_config: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cv")
    config = tiny_config(root / "tiny.yaml", phantoms, {"inference.tta": False})
    out = root / "cv"
    assert main(["crossval", "--config", str(config), "--out", str(out)]) == 0
    return phantoms, out


def test_crossval_writes_folds_oof_summary_and_postprocessing(
    crossval_run: tuple[Path, Path],
) -> None:
    dataset, out = crossval_run
    cases = sorted(c.case_id for c in load_dataset(dataset).training)
    assert [p.name for p in model_runs([out])] == ["fold_0", "fold_1", "fold_2"]
    oof = sorted(p.name for p in (out / "oof" / "probabilities").iterdir())
    assert oof == [f"{c}.nii.gz" for c in cases]  # every case predicted once, out of fold
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 6 and "pooled" in summary["lesion"]
    assert (out / "oof" / "before" / "summary.json").is_file()
    post = json.loads((out / "postprocessing.json").read_text())
    assert post["before"]["threshold"] == 0.5 and post["before"]["min_lesion_mm3"] == 0.0
    # (0.5, 0 mm3) is on the grid, so the tuned choice scores at least as well on the OOF cases
    assert post["after"]["criterion"] >= post["before"]["criterion"]
    sizes = sorted({row["min_lesion_mm3"] for row in post["grid"]})
    assert sizes[: len(MIN_SIZES_MM3)] == list(MIN_SIZES_MM3)
    assert len(post["grid"]) == 17 * len(sizes)
    timings = json.loads((out / "oof" / "seconds.json").read_text())
    assert sorted(timings) == oof and post["seconds_per_case"] == pytest.approx(
        np.mean(list(timings.values()))
    )
    for k in range(3):
        assert json.loads((out / f"fold_{k}" / "postprocessing.json").read_text()) == post
        plan = load_predictor(out / f"fold_{k}").plan
        assert (plan.threshold, plan.min_lesion_mm3) == (
            post["threshold"], post["min_lesion_mm3"],
        )  # fmt: skip


def test_rerun_keeps_finished_folds(
    crossval_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = crossval_run
    stamp = (out / "fold_1" / "checkpoints" / "best.pt").stat().st_mtime_ns
    probs = sorted((out / "oof" / "probabilities").iterdir())
    predicted = {p.name: p.stat().st_mtime_ns for p in probs}
    config = out / "config.yaml"
    assert main(["crossval", "--config", str(config), "--out", str(out), "--folds", "1"]) == 0
    assert "trained now: none" in capsys.readouterr().out
    assert (out / "fold_1" / "checkpoints" / "best.pt").stat().st_mtime_ns == stamp
    # The kept fold's out-of-fold probabilities are read back, not predicted again ...
    assert {p.name: p.stat().st_mtime_ns for p in probs} == predicted
    # ... unless the fold was trained after them.
    done = out / "fold_1" / "crossval_done.json"
    later = max(predicted.values()) + 1_000_000_000
    os.utime(done, ns=(later, later))
    assert main(["crossval", "--config", str(config), "--out", str(out), "--folds", "1"]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in probs}
    renewed = [name for name in predicted if again[name] != predicted[name]]
    val = json.loads((out / "fold_1" / "splits.json").read_text())[1]["val"]
    assert sorted(renewed) == sorted(f"{c}.nii.gz" for c in val)
    assert main(["crossval", "--config", str(config), "--out", str(out), "--folds", "3"]) == 2


@pytest.mark.slow
def test_a_rerun_after_a_kill_in_out_of_fold_prediction_keeps_the_maps_written_before(
    crossval_run: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "cv"
    shutil.copytree(crossval_run[1], out)  # mtimes kept
    old = time.time_ns() - 86_400 * 10**9  # every fold trained before its maps were written
    for k in range(3):
        os.utime(out / f"fold_{k}" / "crossval_done.json", ns=(old, old))
    probs = out / "oof" / "probabilities"
    names = [
        f"{c}.nii.gz" for c in json.loads((out / "fold_0" / "splits.json").read_text())[0]["val"]
    ]
    before = {name: read_image(probs / name).array for name in names}
    for name in names:
        (probs / name).unlink()  # fold 0's maps to predict again
    kept = {p.name: p.stat().st_mtime_ns for p in probs.iterdir()}
    argv = ["crossval", "--config", str(out / "config.yaml"), "--out", str(out)]
    # SIGKILL just before fold 0's second map is renamed into place, half of it written
    killed = fm.run_child([f"--fault=kill@write:{names[1]}#1", "--", *argv])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (probs / names[0]).is_file() and not (probs / names[1]).exists()
    (stale,) = fm.leftovers(out)
    assert stale.startswith(f"oof/probabilities/.{names[1]}.")
    first = (probs / names[0]).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="segmenter"):
        assert main(argv) == 0
    assert f"removed 1 temporary file(s) a killed run left: {stale}" in caplog.text
    assert fm.leftovers(out) == []
    assert (probs / names[0]).stat().st_mtime_ns == first  # written before the kill: kept
    assert {name: (probs / name).stat().st_mtime_ns for name in kept} == kept
    for name in names:
        np.testing.assert_allclose(read_image(probs / name).array, before[name], atol=1e-6)
    timings = json.loads((out / "oof" / "seconds.json").read_text())
    assert sorted(timings) == sorted(p.name for p in probs.iterdir())


def test_predict_with_the_crossval_folder_averages_the_folds(
    crossval_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, out = crossval_run
    case = load_dataset(dataset).test[0]
    predictors = load_predictors([out])
    assert len(predictors) == 3
    options = PredictOptions(tta=False)
    mean, _ = predict_probability(predictors, case, options)
    singles = [predict_probability(p, case, options)[0] for p in predictors]
    np.testing.assert_allclose(mean, np.mean(singles, axis=0), atol=1e-6)
    argv = ["predict", "--model", str(out), "--input", str(dataset / "imagesTs"),
            "--output", str(tmp_path / "pred"), "--no-tta"]  # fmt: skip
    assert main(argv) == 0
    assert "(3 models)" in capsys.readouterr().out
    assert (tmp_path / "pred" / f"{case.case_id}.nii.gz").is_file()
    two = [str(out / "fold_0"), str(out / "fold_2")]
    argv = ["predict", "--model", *two, "--input", str(dataset / "imagesTs"),
            "--output", str(tmp_path / "two"), "--no-tta"]  # fmt: skip
    assert main(argv) == 0
    assert "(2 models)" in capsys.readouterr().out


def test_devices_train_the_folds_in_parallel_processes_with_the_same_result(
    crossval_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --devices cpu cpu: each fold a `segmenter train` process of its own, two at a time; the
    # config fixes train.threads, so every fold trains as the sequential run did, bit for bit.
    import torch

    from segmenter.workflows.crossval import DONE_FILE

    _, sequential = crossval_run
    out = tmp_path / "par"
    argv = ["crossval", "--config", str(sequential / "config.yaml"), "--out", str(out),
            "--devices", "cpu", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "trained now: [0, 1, 2]" in capsys.readouterr().out
    for k in range(3):
        a = torch.load(sequential / f"fold_{k}" / "checkpoints" / "last.pt", weights_only=True)
        b = torch.load(out / f"fold_{k}" / "checkpoints" / "last.pt", weights_only=True)
        assert a["step"] == b["step"]
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
        done = json.loads((out / f"fold_{k}" / DONE_FILE).read_text())
        assert done["steps"] == a["step"] and done["epochs"] == a["epoch"]
        assert "fold " in (out / f"fold_{k}.console.log").read_text()
    # the same models, so the same out-of-fold maps (the sequential folder's postprocessing.json
    # may have been re-tuned on one fold by another test of this module; its maps stay)
    maps = sorted((out / "oof" / "probabilities").iterdir())
    assert [m.name for m in maps] == sorted(
        m.name for m in (sequential / "oof" / "probabilities").iterdir()
    )
    for m in maps:
        ref = read_image(sequential / "oof" / "probabilities" / m.name).array
        assert np.array_equal(read_image(m).array, ref), m.name
    assert main(argv) == 0  # a rerun keeps every finished fold
    assert "trained now: none" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("devices", "message"),
    [(["gpu"], "'gpu' is neither a CUDA index nor cpu"), (["0"], "CUDA device 0 not present")],
)
def test_bad_devices_exit_2_before_anything_runs(
    crossval_run: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    devices: list[str],
    message: str,
) -> None:
    import torch

    if devices == ["0"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, sequential = crossval_run
    out = tmp_path / "bad"
    argv = ["crossval", "--config", str(sequential / "config.yaml"), "--out", str(out),
            "--devices", *devices]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_fold_process_starts_no_more_and_is_named_in_one_line(
    tiny_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path / "c.yaml", tmp_path / "no_such_dataset")
    out = tmp_path / "cv"
    argv = ["crossval", "--config", str(config), "--out", str(out), "--devices", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "training of fold 0 into" in err and "failed (exit 2)" in err
    assert "not found" in (out / "fold_0.console.log").read_text()
    assert not (out / "fold_1.console.log").exists()  # one device: fold 1 never started
