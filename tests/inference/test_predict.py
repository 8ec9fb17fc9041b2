"""Tests for segmenter.inference.predict: the cases ``--input`` names, where their masks go, which
threshold and minimum size apply, masks written in the input's geometry, a folder read one case
ahead, and ``--resume`` after a failure or a kill."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_faults import fm

from segmenter.cli import main
from segmenter.config import InferenceConfig
from segmenter.data.layout import Case
from segmenter.errors import InputError
from segmenter.inference import predict as predict_module
from segmenter.inference.predict import (
    PROBABILITY_FOLDER,
    PredictOptions,
    collect_cases,
    ensemble,
    output_paths,
    predict_all,
    predict_case,
    predict_probability,
)
from segmenter.inference.predictor import Predictor
from segmenter.io import read_image, write_like


def channels(phantoms: Path, case: str = "phantom_test_000") -> list[Path]:
    return [phantoms / "imagesTs" / f"{case}_{c:04d}.nii.gz" for c in range(2)]


def one_case(case_id: str, *names: str) -> Case:
    return Case(case_id=case_id, images=tuple(Path(n) for n in names), label=None)


# ------------------------------------------------------------------------------------------
# collect_cases


def test_a_folder_gives_every_case_in_it(predictor: Predictor, phantoms: Path) -> None:
    cases = collect_cases([phantoms / "imagesTs"], predictor)
    assert [c.case_id for c in cases] == ["phantom_test_000", "phantom_test_001"]
    assert all(c.label is None for c in cases)
    assert list(cases[0].images) == channels(phantoms)


def test_files_are_the_channels_of_one_case(
    predictor: Predictor, phantoms: Path, tmp_path: Path
) -> None:
    (case,) = collect_cases(channels(phantoms), predictor)
    assert case.case_id == "phantom_test_000" and list(case.images) == channels(phantoms)
    flair = shutil.copy(channels(phantoms)[0], tmp_path / "scan.nii.gz")
    t1 = shutil.copy(channels(phantoms)[1], tmp_path / "t1.nii.gz")
    (case,) = collect_cases([flair, t1], predictor)
    assert case.case_id == "scan"  # no _XXXX channel suffix to strip


def test_the_wrong_number_of_files_names_the_channels(predictor: Predictor, phantoms: Path) -> None:
    with pytest.raises(InputError, match=r"expects 2 channel\(s\) \(FLAIR, T1\) but 1 input"):
        collect_cases(channels(phantoms)[:1], predictor)
    with pytest.raises(InputError, match="but 3 input file"):
        collect_cases([*channels(phantoms), channels(phantoms)[0]], predictor)


def test_missing_inputs_and_mixed_inputs_are_refused(
    predictor: Predictor, phantoms: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=r"missing_0001\.nii\.gz: input not found"):
        collect_cases([channels(phantoms)[0], tmp_path / "missing_0001.nii.gz"], predictor)
    with pytest.raises(InputError, match="takes one folder, or one file per channel"):
        collect_cases([phantoms / "imagesTs", channels(phantoms)[0]], predictor)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="empty: no image files found"):
        collect_cases([tmp_path / "empty"], predictor)


# ------------------------------------------------------------------------------------------
# output_paths


def test_one_case_with_a_file_name_is_written_there(tmp_path: Path) -> None:
    case = one_case("scan", "in/scan_0000.nii.gz", "in/scan_0001.nii.gz")
    out = tmp_path / "mask.nii.gz"
    assert output_paths([case], out, single_file_ok=True) == {"scan": out}
    # from a folder input, the output is a folder even when named like a file
    assert output_paths([case], out, single_file_ok=False) == {"scan": out / "scan.nii.gz"}


def test_several_cases_go_into_a_folder_with_the_input_ending(tmp_path: Path) -> None:
    cases = [one_case("a", "in/a_0000.nii"), one_case("b", "in/b_0000.nii")]
    paths = output_paths(cases, tmp_path / "pred", single_file_ok=True)
    assert paths == {"a": tmp_path / "pred" / "a.nii", "b": tmp_path / "pred" / "b.nii"}
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(InputError, match="taken: output exists and is not a folder"):
        output_paths(cases, tmp_path / "taken", single_file_ok=True)


# ------------------------------------------------------------------------------------------
# threshold and minimum size


def test_options_win_over_the_runs_postprocessing_where_set(predictor: Predictor) -> None:
    plan = predictor.plan.with_postprocessing(0.4, 10.0)
    assert PredictOptions().postprocessing(plan) == (0.4, 10.0)
    assert PredictOptions(threshold=0.2).postprocessing(plan) == (0.2, 10.0)
    assert PredictOptions(min_lesion_mm3=25.0).postprocessing(plan) == (0.4, 25.0)
    # zero is a setting, not "unset"
    assert PredictOptions(threshold=0.0, min_lesion_mm3=0.0).postprocessing(plan) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------
# ensembles and prediction


def test_an_ensemble_must_agree_on_channels_and_activation(predictor: Predictor) -> None:
    assert ensemble(predictor) == [predictor]
    with pytest.raises(InputError, match="no model to predict with"):
        ensemble([])
    other = dataclasses.replace(
        predictor, plan=dataclasses.replace(predictor.plan, channel_names=("T2", "T1"))
    )
    with pytest.raises(InputError, match=r"channels \['T2', 'T1'\] differ from"):
        ensemble([predictor, other])
    softmax = dataclasses.replace(
        predictor, plan=dataclasses.replace(predictor.plan, activation="softmax", out_channels=2)
    )
    with pytest.raises(InputError, match="another output activation than the others"):
        ensemble([predictor, softmax])


def test_a_case_with_too_few_channels_is_refused(predictor: Predictor, phantoms: Path) -> None:
    case = Case("c", tuple(channels(phantoms)[:1]), None)
    with pytest.raises(InputError, match=r"expects 2 channel\(s\), the case has 1"):
        predict_probability(predictor, case, PredictOptions(tta=False))


def test_predict_all_writes_masks_with_the_inputs_geometry(
    predictor: Predictor, phantoms: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    options = PredictOptions(tta=False, threshold=0.5, min_lesion_mm3=0.0, save_probabilities=True)
    seen: list[int] = []

    def progress(cases: list[Case], n: int) -> list[Case]:
        seen.append(n)
        return cases

    predictions = predict_all(predictor, [phantoms / "imagesTs"], out, options, progress)
    assert seen == [2] and [p.case_id for p in predictions] == [
        "phantom_test_000", "phantom_test_001",
    ]  # fmt: skip
    for prediction in predictions:
        scan = read_image(phantoms / "imagesTs" / f"{prediction.case_id}_0000.nii.gz")
        mask = read_image(prediction.mask_path)
        assert prediction.mask_path == out / f"{prediction.case_id}.nii.gz"
        assert mask.array.dtype == np.uint8 and mask.array.shape == scan.array.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-6)
        assert prediction.probability_path == out / PROBABILITY_FOLDER / prediction.mask_path.name
        prob = read_image(prediction.probability_path)
        assert prob.array.dtype == np.float32 and prob.array.shape == scan.array.shape
        np.testing.assert_allclose(prob.affine, scan.affine, atol=1e-6)
        np.testing.assert_array_equal(mask.array, prob.array >= 0.5)  # no size filter here
        assert prediction.n_lesion_voxels == int(mask.array.sum())
        assert prediction.seconds > 0


def test_one_case_given_as_files_is_written_to_the_named_file(
    predictor: Predictor, phantoms: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mask.nii.gz"
    (prediction,) = predict_all(predictor, channels(phantoms), out, PredictOptions(tta=False))
    assert prediction.mask_path == out and out.is_file()
    assert prediction.probability_path is None and not (tmp_path / PROBABILITY_FOLDER).exists()


def test_tta_choices_of_the_command_line_reach_the_prediction(
    trained_run: Path, phantoms: Path, tmp_path: Path
) -> None:
    from segmenter import cli

    probabilities = {}
    for choice in ("all", "single", "none"):
        out = tmp_path / choice / "mask.nii.gz"
        argv = ["predict", "--model", str(trained_run), "--input",
                *map(str, channels(phantoms)), "--output", str(out), "--device", "cpu",
                "--tta", choice, "--save-probabilities"]  # fmt: skip
        assert cli.main(argv) == 0
        probabilities[choice] = read_image(out.parent / PROBABILITY_FOLDER / out.name).array
    no_tta = tmp_path / "no_tta" / "mask.nii.gz"
    argv = ["predict", "--model", str(trained_run), "--input", *map(str, channels(phantoms)),
            "--output", str(no_tta), "--device", "cpu", "--no-tta",
            "--save-probabilities"]  # fmt: skip
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(
        read_image(no_tta.parent / PROBABILITY_FOLDER / no_tta.name).array, probabilities["none"]
    )
    for a, b in (("all", "single"), ("all", "none"), ("single", "none")):
        assert np.abs(probabilities[a] - probabilities[b]).max() > 1e-4, (a, b)


# ------------------------------------------------------------------------------------------
# streaming a folder, --resume, a killed predict


def case_folder(phantoms: Path, folder: Path, names: list[str]) -> Path:
    """A folder of cases named ``names``, copies of the test phantoms in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        for c, src in enumerate(channels(phantoms, f"phantom_test_{i % 2:03d}")):
            shutil.copy(src, folder / f"{name}_{c:04d}.nii.gz")
    return folder


def masks(folder: Path) -> list[str]:
    """The mask files in ``folder`` (temporary files, hidden, left out)."""
    return sorted(p.name for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def test_a_folder_is_read_one_case_ahead_in_a_thread_and_gives_the_sequential_masks(
    predictor: Predictor, phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["a", "b", "c", "d"]
    inputs, out = case_folder(phantoms, tmp_path / "in", names), tmp_path / "streamed"
    options = PredictOptions(tta=False, threshold=0.5, min_lesion_mm3=0.0, save_probabilities=True)
    started = {n: threading.Event() for n in names}
    reads: list[tuple[str, str, int]] = []  # case, thread, masks written when its read began
    overlapped: list[bool] = []
    read_case, predict_logits = predict_module.read_case, predict_module.predict_logits

    def reading(case: Case, *, with_label: bool) -> object:
        reads.append((case.case_id, threading.current_thread().name, len(masks(out))))
        started[case.case_id].set()
        return read_case(case, with_label=with_label)

    def computing(*args: object, **kwargs: object) -> object:
        nxt = len(overlapped) + 1  # while case k is predicted, case k + 1 is being read
        overlapped.append(nxt == len(names) or started[names[nxt]].wait(timeout=10))
        return predict_logits(*args, **kwargs)

    monkeypatch.setattr(predict_module, "read_case", reading)
    monkeypatch.setattr(predict_module, "predict_logits", computing)
    streamed = predict_all(predictor, [inputs], out, options)
    assert [r[0] for r in reads] == names and overlapped == [True] * 4
    assert all(r[1].startswith("segmenter-read") for r in reads)
    assert [r[2] for r in reads] == [0, 0, 1, 2]  # one case ahead, never two
    monkeypatch.undo()
    for case, prediction in zip(collect_cases([inputs], predictor), streamed, strict=True):
        alone = predict_case(predictor, case, tmp_path / "alone" / f"{case.case_id}.nii.gz",
                             options)  # fmt: skip
        for a, b in ((alone.mask_path, prediction.mask_path),
                     (alone.probability_path, prediction.probability_path)):  # fmt: skip
            assert a is not None and b is not None
            np.testing.assert_array_equal(read_image(a).array, read_image(b).array)


def test_a_case_that_cannot_be_read_stops_a_folder_when_it_is_reached(
    trained_run: Path, phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = case_folder(phantoms, tmp_path / "in", ["a", "b", "c"])
    broken = read_image(inputs / "b_0001.nii.gz")
    broken.array[3, 4, 5] = np.nan  # a header check cannot see it; reading the voxels does
    write_like(inputs / "b_0001.nii.gz", broken.array, broken)
    out = tmp_path / "pred"
    argv = ["predict", "--model", str(trained_run), "--input", str(inputs), "--output", str(out),
            "--no-tta"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]  # the rest: the bar
    assert line == f"error: {inputs / 'b_0001.nii.gz'}: non-finite voxels (1 NaN, 0 inf of 32768)"
    assert "Traceback" not in err
    assert masks(out) == ["a.nii.gz"]
    assert fm.leftovers(out) == []


def set_old_mtimes(paths: list[Path]) -> dict[Path, int]:
    """Give ``paths`` an mtime of a day ago, so that a rewrite shows; returns the mtimes."""
    old = time.time_ns() - 86_400 * 10**9
    for path in paths:
        os.utime(path, ns=(old, old))
    return {p: p.stat().st_mtime_ns for p in paths}


def test_resume_skips_the_cases_whose_outputs_are_complete_and_predicts_the_others(
    trained_run: Path,
    phantoms: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    inputs, out = case_folder(phantoms, tmp_path / "in", ["a", "b", "c"]), tmp_path / "pred"
    argv = ["predict", "--model", str(trained_run), "--input", str(inputs), "--output", str(out),
            "--no-tta", "--save-probabilities"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert [ln.split(":")[0] for ln in first.splitlines()[:3]] == ["a", "b", "c"]
    assert "3 case(s) predicted, " in first and "skipped" not in first
    files = [folder / name for folder in (out, out / PROBABILITY_FOLDER) for name in masks(folder)]
    kept = set_old_mtimes(files)
    (out / "b.nii.gz").unlink()  # no mask: predicted again
    (out / PROBABILITY_FOLDER / "c.nii.gz").unlink()  # mask without its map: predicted again
    with caplog.at_level(logging.INFO, logger="segmenter"):
        assert main([*argv, "--resume"]) == 0
    again = capsys.readouterr().out
    assert "2 case(s) predicted, 1 skipped (finished before)" in again
    assert [ln.split(":")[0] for ln in again.splitlines()[:2]] == ["b", "c"]
    assert "a: finished before" in caplog.text
    now = {p: p.stat().st_mtime_ns for p in files}
    assert [p for p in files if now[p] == kept[p]] == [
        out / "a.nii.gz", out / PROBABILITY_FOLDER / "a.nii.gz",
    ]  # fmt: skip
    kept = set_old_mtimes(files)
    assert main(argv) == 0  # without --resume every mask is written again, as before
    assert "3 case(s) predicted, " in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns != kept[p] for p in files)


@pytest.mark.slow
def test_a_predict_killed_halfway_through_a_folder_resumes_with_every_mask_whole(
    trained_run: Path, phantoms: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs, out = case_folder(phantoms, tmp_path / "in", ["a", "b", "c"]), tmp_path / "pred"
    argv = ["predict", "--model", str(trained_run), "--input", str(inputs), "--output", str(out),
            "--no-tta"]  # fmt: skip
    # SIGKILL just before b's mask is renamed into place, half of it written
    killed = fm.run_child(["--fault=kill@write:b.nii.gz#1", "--", *argv])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert masks(out) == ["a.nii.gz"]  # b's is not under its name
    (stale,) = fm.leftovers(out)
    assert stale.startswith(".b.nii.gz.")
    kept = set_old_mtimes([out / "a.nii.gz"])
    with caplog.at_level(logging.INFO, logger="segmenter"):
        assert main([*argv, "--resume"]) == 0
    assert f"removed 1 temporary file(s) a killed run left: {stale}" in caplog.text
    assert (out / "a.nii.gz").stat().st_mtime_ns == kept[out / "a.nii.gz"]
    assert fm.leftovers(out) == []
    assert main([*argv[:-2], str(tmp_path / "whole"), "--no-tta"]) == 0
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        expected = read_image(tmp_path / "whole" / name).array
        np.testing.assert_array_equal(read_image(out / name).array, expected)


def test_options_override_the_runs_tta_mirroring_and_overlap_only_where_set() -> None:
    run = InferenceConfig(overlap=0.5, tta=True, mirroring="all", sw_batch_size=3)
    assert PredictOptions().inference(run) == run
    changed = PredictOptions(tta=False, mirroring="single", overlap=0.25).inference(run)
    assert changed == dataclasses.replace(run, tta=False, mirroring="single", overlap=0.25)


def test_a_bad_overlap_is_one_usage_line(trained_run: Path, phantoms: Path, tmp_path: Path) -> None:
    from segmenter import cli

    argv = ["predict", "--model", str(trained_run), "--input", *map(str, channels(phantoms)),
            "--output", str(tmp_path / "m.nii.gz"), "--overlap", "1"]  # fmt: skip
    assert cli.main(argv) == 2
    assert not (tmp_path / "m.nii.gz").exists()
