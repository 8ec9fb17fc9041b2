"""Tests for segmenter.planning.run_plan: the typed, versioned plan of a trained run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from segmenter.config import ChannelNormalization
from segmenter.errors import InputError
from segmenter.evaluation.report import json_safe
from segmenter.planning.run_plan import FORMAT_VERSION, RunPlan, migrate
from segmenter.preprocessing.spec import PreprocessingSpec

FIXTURE_PLAN = Path(__file__).parents[1] / "fixtures" / "run_format_v0" / "plan.json"
MRI = (ChannelNormalization(channel="FLAIR"), ChannelNormalization(channel="T1"))


def _plan(**changes: object) -> RunPlan:
    plan = RunPlan(
        dataset="Dataset900_Phantom", channel_names=("FLAIR", "T1"),
        labels={"background": 0, "lesion": 1}, activation="sigmoid", out_channels=1,
        patch_size=(32, 32, 32),
        preprocessing=PreprocessingSpec(
            target_spacing=(1.0, 1.0, 1.0), clip_percentiles=(0.5, 99.5),
            normalization=MRI,
        ),
        median_spacing=(1.2, 1.2, 1.2), threshold=0.5, min_lesion_mm3=0.0, fold=0,
    )  # fmt: skip
    return dataclasses.replace(plan, **changes)


def test_a_plan_survives_json_and_carries_the_format_version() -> None:
    plan = _plan(threshold_tuning={"criterion": "c", "tta": False, "rows": []})
    values = json.loads(json.dumps(plan.to_json()))
    assert values["format_version"] == FORMAT_VERSION
    assert RunPlan.from_json(values) == plan


def test_the_plan_json_keys_are_those_of_format_0_plus_the_version() -> None:
    old = json.loads(FIXTURE_PLAN.read_text())
    new = RunPlan.from_json(old).to_json()
    assert list(new) == ["format_version", *old]
    # the same values, but strict JSON: format 0 wrote an undefined precision as a bare NaN
    assert {k: v for k, v in new.items() if k != "format_version"} == json_safe(old)
    assert "NaN" in FIXTURE_PLAN.read_text() and "NaN" not in json.dumps(new)


def test_format_0_reads_as_version_0_and_is_written_as_the_current_one() -> None:
    old = json.loads(FIXTURE_PLAN.read_text())
    plan = RunPlan.from_json(old)
    assert plan.format_version == 0 and plan.fold == 0 and plan.threshold == old["threshold"]
    assert plan.preprocessing == PreprocessingSpec(
        crop_to_nonzero=True, target_spacing=(1.0, 1.0, 1.0), clip_percentiles=(0.5, 99.5),
        normalization=MRI,
    )  # fmt: skip
    assert plan.to_json()["format_version"] == FORMAT_VERSION


def test_runs_from_before_ct_resampling_and_clipping_read_as_they_behaved() -> None:
    old = _plan().to_json()
    del old["format_version"], old["target_spacing"], old["clip_percentiles"], old["file_ending"]
    old["normalization"] = "zscore_nonzero"
    plan = RunPlan.from_json(old)
    spec = plan.preprocessing
    assert spec.target_spacing is None and spec.clip_percentiles is None
    assert [n.scheme for n in spec.normalization] == ["zscore_nonzero"] * 2
    assert [n.channel for n in spec.normalization] == ["FLAIR", "T1"]
    assert plan.file_ending == ".nii.gz"


def test_ct_normalisation_is_read_back_checked() -> None:
    values = _plan().to_json()
    values["normalization"][0] = {"channel": "CT", "scheme": "ct_clip_zscore",
                                  "clip": [-100, 200], "mean": 5, "std": 9}  # fmt: skip
    ct, mri = RunPlan.from_json(values).preprocessing.normalization
    assert ct == ChannelNormalization("ct_clip_zscore", "CT", (-100, 200), 5, 9)
    assert mri.scheme == "zscore_nonzero" and mri.channel == "T1"
    values["normalization"][0]["std"] = 0
    with pytest.raises(InputError, match="std must be > 0"):
        RunPlan.from_json(values)


def test_a_newer_or_broken_plan_is_refused_with_one_line() -> None:
    values = _plan().to_json()
    with pytest.raises(InputError, match="run.pt: run plan format 2 is newer"):
        RunPlan.from_json({**values, "format_version": FORMAT_VERSION + 1}, source="run.pt")
    with pytest.raises(InputError, match="bad run plan format_version"):
        migrate({**values, "format_version": "one"})
    with pytest.raises(InputError, match="has no 'patch_size'"):
        RunPlan.from_json({k: v for k, v in values.items() if k != "patch_size"})
    with pytest.raises(InputError, match="must be a mapping"):
        migrate([1, 2])  # type: ignore[arg-type]


def test_postprocessing_and_tuning_return_new_plans() -> None:
    plan = _plan()
    tuned = plan.with_postprocessing(0.3, 20)
    assert (tuned.threshold, tuned.min_lesion_mm3) == (0.3, 20.0)
    assert (plan.threshold, plan.min_lesion_mm3) == (0.5, 0.0)
    retuned = plan.with_threshold(0.4, {"criterion": "c"})
    assert retuned.threshold == 0.4 and retuned.threshold_tuning == {"criterion": "c"}
    assert plan.threshold_tuning is None
