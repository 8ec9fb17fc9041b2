"""Tests for segmenter.training.state: what ``last.pt`` restores, the moving average that selects
``best.pt``, and ``metrics.csv``."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch

from segmenter.config import Config, config_from_dict, load_config
from segmenter.nn.checkpoint import load_checkpoint, save_checkpoint
from segmenter.planning.run_plan import RunPlan
from segmenter.training.state import (
    EMA_WEIGHT,
    HISTORY_KEYS,
    EpochProgress,
    TrainState,
    history_csv,
    moving_average,
    seed_step,
)

NAN = float("nan")


def row(epoch: int, **values: float) -> dict[str, float]:
    return {"epoch": float(epoch), "step": 2.0 * epoch, **values}


@pytest.fixture(scope="module")
def run_settings(trained_run: Path) -> tuple[Config, RunPlan]:
    """The shared tiny run's config and plan."""
    plan = RunPlan.from_json(json.loads((trained_run / "plan.json").read_text()))
    return load_config(trained_run / "config.yaml"), plan


def test_a_state_survives_a_checkpoint(
    run_settings: tuple[Config, RunPlan], tmp_path: Path
) -> None:
    cfg, plan = run_settings
    model = torch.nn.Conv3d(2, 1, kernel_size=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = [row(1, val_dice=0.2, val_ema=0.2), row(2, train_loss=0.7), row(3, val_ema=0.35)]
    state = TrainState(epoch=3, step=6, elapsed_s=12.5, best_metric=0.35, best_epoch=3,
                       history=history)  # fmt: skip
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "last.pt", state.checkpoint(model, optimizer, cfg, plan))
    loaded = load_checkpoint(path)  # weights_only: only plain types went in
    assert TrainState.from_checkpoint(loaded) == state
    assert config_from_dict(loaded["config"]) == cfg
    assert json.dumps(RunPlan.from_json(loaded["plan"]).to_json()) == json.dumps(plan.to_json())
    assert loaded["scheduler"] == {"kind": cfg.train.scheduler, "elapsed_s": 12.5}
    assert torch.equal(loaded["rng"]["torch"], rng)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded["model"][key], value, rtol=0, atol=0)


def test_a_fresh_state_survives_a_checkpoint_too(
    run_settings: tuple[Config, RunPlan], tmp_path: Path
) -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    payload = TrainState().checkpoint(model, optimizer, *run_settings)
    path = save_checkpoint(tmp_path / "c.pt", payload)
    restored = TrainState.from_checkpoint(load_checkpoint(path))
    assert restored == TrainState() and restored.best_metric == -math.inf
    assert restored.ema is None


def test_a_state_inside_an_epoch_survives_a_checkpoint_with_its_progress(
    run_settings: tuple[Config, RunPlan], tmp_path: Path
) -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    progress = EpochProgress(steps=2, losses=[0.75, 0.5], lr=0.004, seconds=3.5, wait_s=0.25)
    state = TrainState(epoch=1, step=5, history=[row(1, train_loss=0.9)], progress=progress)
    path = save_checkpoint(tmp_path / "last.pt", state.checkpoint(model, optimizer, *run_settings))
    loaded = torch.load(path, weights_only=True)  # plain types only
    assert loaded["epoch_progress"] == {"steps": 2, "losses": [0.75, 0.5], "lr": 0.004,
                                        "seconds": 3.5, "wait_s": 0.25}  # fmt: skip
    assert TrainState.from_checkpoint(load_checkpoint(path)) == state


def test_a_checkpoint_without_epoch_progress_is_at_an_epoch_boundary(
    run_settings: tuple[Config, RunPlan], tmp_path: Path
) -> None:
    model = torch.nn.Linear(2, 1)
    payload = TrainState(epoch=2, step=4).checkpoint(
        model, torch.optim.SGD(model.parameters(), lr=1.0), *run_settings
    )
    del payload["epoch_progress"]  # as every checkpoint written before the key existed
    restored = TrainState.from_checkpoint(
        load_checkpoint(save_checkpoint(tmp_path / "c.pt", payload))
    )
    assert (restored.epoch, restored.step, restored.progress) == (2, 4, EpochProgress())


def test_ending_an_epoch_counts_it_clears_its_progress_and_keeps_its_row() -> None:
    state = TrainState(epoch=1, step=6, progress=EpochProgress(steps=3, losses=[1.0, 2.0, 3.0]))
    state.end_epoch(row(2, train_loss=2.0))
    assert (state.epoch, state.step, state.progress) == (2, 6, EpochProgress())
    assert state.history == [row(2, train_loss=2.0)]


def test_the_shared_runs_last_checkpoint_holds_its_one_epoch(trained_run: Path) -> None:
    state = TrainState.from_checkpoint(load_checkpoint(trained_run / "checkpoints" / "last.pt"))
    assert (state.epoch, state.step, state.best_epoch) == (1, 2, 1)
    assert len(state.history) == 1 and state.history[0]["epoch"] == 1
    assert state.elapsed_s > 0 and state.ema == state.history[0]["val_ema"]


def test_ema_is_the_last_validation_moving_average() -> None:
    assert TrainState().ema is None
    assert TrainState(history=[row(1, train_loss=1.0)]).ema is None  # no validation yet
    history = [row(1, val_ema=0.1), row(2, val_ema=0.3), row(3, train_loss=0.5)]
    assert TrainState(history=history).ema == 0.3  # epoch 3 did not validate


def test_moving_average_starts_at_the_first_value_and_skips_nan() -> None:
    assert EMA_WEIGHT == 0.5
    assert moving_average(None, 0.4) == 0.4
    assert moving_average(0.4, 0.8) == pytest.approx(0.6)
    assert moving_average(0.6, NAN) == 0.6  # a validation without lesions changes nothing
    assert moving_average(None, NAN) is None


def test_history_csv_leaves_nan_and_missing_cells_empty() -> None:
    history = [row(1, lr=0.01, train_loss=0.5, val_dice=NAN, val_ema=0.0),
               {"epoch": 2.0, "step": None, "lr": 0.005}]  # type: ignore[dict-item]  # fmt: skip
    text = history_csv(history)
    lines = text.splitlines()
    assert lines[0] == ",".join(HISTORY_KEYS)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 and list(rows[0]) == list(HISTORY_KEYS)
    assert (rows[0]["epoch"], rows[0]["lr"], rows[0]["train_loss"]) == ("1.0", "0.01", "0.5")
    assert rows[0]["val_dice"] == "" and rows[0]["val_ema"] == "0.0"  # zero is a value
    assert rows[1]["step"] == "" and rows[1]["lr"] == "0.005"
    assert all(rows[1][k] == "" for k in HISTORY_KEYS if k not in ("epoch", "lr"))
    assert history_csv([]) == ",".join(HISTORY_KEYS) + "\n"


def test_a_step_draws_its_dropout_masks_from_the_seed_the_rank_and_the_step() -> None:
    def mask(seed: int, rank: int, step: int) -> torch.Tensor:
        torch.manual_seed(123)  # whatever came before does not matter
        seed_step(seed, rank, step)
        return torch.nn.functional.dropout(torch.ones(4096), p=0.5) > 0

    first = mask(0, 0, 5)
    assert torch.equal(first, mask(0, 0, 5))
    for other in (mask(0, 1, 5), mask(0, 0, 6), mask(1, 0, 5), mask(-1, 0, 5)):
        assert not torch.equal(first, other)
