"""Tests for segmenter.inference.predict: the cases ``--input`` names, where their masks go, which
threshold and minimum size apply, and masks written in the input's geometry."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from segmenter.data.layout import Case
from segmenter.errors import InputError
from segmenter.inference.predict import (
    PROBABILITY_FOLDER,
    PredictOptions,
    collect_cases,
    ensemble,
    output_paths,
    predict_all,
    predict_probability,
)
from segmenter.inference.predictor import Predictor
from segmenter.io import read_image


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
