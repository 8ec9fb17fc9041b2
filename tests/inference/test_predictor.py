"""Tests for segmenter.inference.predictor: a trained run loaded for inference, its tuned
post-processing, and the runs a ``--model`` folder names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from segmenter.config import load_config
from segmenter.errors import InputError
from segmenter.inference.predictor import (
    POSTPROCESSING_FILE,
    Predictor,
    load_predictor,
    load_predictors,
    model_runs,
)
from segmenter.planning.run_plan import RunPlan


def same_plan(a: RunPlan, b: RunPlan) -> bool:
    """Plans equal as written (the tuning rows hold NaN precisions, which never compare equal)."""
    return json.dumps(a.to_json()) == json.dumps(b.to_json())


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """The shared tiny run copied, so a test can add files to it."""
    return shutil.copytree(trained_run, tmp_path / "run")


def test_load_predictor_gives_the_run_in_eval_mode(predictor: Predictor, trained_run: Path) -> None:
    assert predictor.checkpoint == trained_run / "checkpoints" / "best.pt"
    assert not predictor.model.training
    assert predictor.device == torch.device("cpu") and predictor.dtype is None  # fp32 run
    assert predictor.config == load_config(trained_run / "config.yaml")
    plan = RunPlan.from_json(json.loads((trained_run / "plan.json").read_text()))
    assert same_plan(predictor.plan, plan) and predictor.postprocessing_file is None
    assert predictor.patch_size == (32, 32, 32)
    assert predictor.channel_names == ["FLAIR", "T1"]
    weights = torch.load(predictor.checkpoint, weights_only=True)["model"]
    for key, value in predictor.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_which_picks_the_last_checkpoint(trained_run: Path) -> None:
    last = load_predictor(trained_run, device="cpu", which="last")
    assert last.checkpoint == trained_run / "checkpoints" / "last.pt"


def test_postprocessing_json_overrides_threshold_and_min_size(
    run_copy: Path, predictor: Predictor
) -> None:
    post = run_copy / POSTPROCESSING_FILE
    post.write_text(json.dumps({"threshold": 0.3, "min_lesion_mm3": 12.5, "criterion": 0.8}))
    tuned = load_predictor(run_copy, device="cpu")
    assert (tuned.plan.threshold, tuned.plan.min_lesion_mm3) == (0.3, 12.5)
    assert tuned.postprocessing_file == post
    assert same_plan(tuned.plan, predictor.plan.with_postprocessing(0.3, 12.5))  # only those


@pytest.mark.parametrize(
    "text",
    ['{"threshold": 0.3', '{"threshold": 0.3}', '{"threshold": "high", "min_lesion_mm3": 0}',
     "[0.3, 10]"],
    ids=["truncated", "no min size", "not a number", "a list"],
)  # fmt: skip
def test_a_broken_postprocessing_json_is_one_input_error(run_copy: Path, text: str) -> None:
    (run_copy / POSTPROCESSING_FILE).write_text(text)
    unreadable = r"postprocessing\.json: unreadable post-processing file \("
    with pytest.raises(InputError, match=unreadable) as info:
        load_predictor(run_copy, device="cpu")
    assert "\n" not in str(info.value)


def test_a_run_without_checkpoints_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(InputError, match="no checkpoint"):
        load_predictor(tmp_path / "run", device="cpu")


def test_model_runs_finds_the_folds_of_a_crossval_folder(tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    for fold in ("fold_0", "fold_1", "fold_2", "fold_10"):
        (cv / fold / "checkpoints").mkdir(parents=True)
    (cv / "fold_3").mkdir()  # not trained: no checkpoints folder
    (cv / "fold_x" / "checkpoints").mkdir(parents=True)  # not a fold number
    (cv / "oof").mkdir()
    folds = [cv / f"fold_{k}" for k in (0, 1, 2, 10)]  # in fold order, not name order
    assert model_runs([cv]) == folds
    assert model_runs([cv / "fold_1"]) == [cv / "fold_1"]  # a run itself
    assert model_runs([cv / "fold_2", cv]) == [cv / "fold_2", *folds]
    assert model_runs([tmp_path / "missing"]) == [tmp_path / "missing"]  # fails when loaded


def test_load_predictors_loads_every_fold(trained_run: Path, tmp_path: Path) -> None:
    for fold in ("fold_0", "fold_1"):
        shutil.copytree(trained_run, tmp_path / "cv" / fold)
    predictors = load_predictors([tmp_path / "cv"], device="cpu")
    assert [p.checkpoint.parent.parent.name for p in predictors] == ["fold_0", "fold_1"]


def test_an_auto_layout_model_predicts_contiguous_on_the_cpu_with_the_same_logits(
    trained_run: Path,
) -> None:
    loaded = load_predictor(trained_run, device="cpu")
    assert loaded.config.model.memory_format == "auto"
    assert not loaded.model.channels_last(torch.device("cpu"))
    x = torch.randn(1, len(loaded.channel_names), 32, 32, 32)
    with torch.no_grad():
        contiguous = loaded.model(x)
        loaded.model.memory_format = "channels_last"
        loaded.model.place(torch.device("cpu"))
        torch.testing.assert_close(loaded.model(x), contiguous, atol=1e-4, rtol=1e-4)
