"""Tests for segmenter.nn.checkpoint: a plain-dict checkpoint that loads with ``weights_only=True``,
one-line errors for anything else, and the best-then-last lookup of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from segmenter.errors import InputError
from segmenter.nn.checkpoint import (
    FORMAT_VERSION,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def small_state() -> dict[str, Any]:
    """The required keys with a real ``state_dict`` and plain values beside it."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 1, kernel_size=1)
    return {
        "model": model.state_dict(),
        "config": {"train": {"epochs": 3}},
        "plan": {"patch_size": [8, 8, 8], "channel_names": ["FLAIR", "T1"]},
        "epoch": 3,
        "step": 6,
        "best_metric": float("-inf"),
        "history": [{"epoch": 1.0, "val_dice": float("nan")}],
    }


class WritesAMarker:
    """Unpickling this runs code: it writes ``marker`` (a checkpoint must never do that)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_checkpoint_round_trips_and_loads_with_weights_only(tmp_path: Path) -> None:
    state = small_state()
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", state)
    assert path == tmp_path / "run" / "checkpoints" / "best.pt"
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temporary file left
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT_VERSION
    assert loaded.keys() == {"format", *state}
    for key, tensor in state["model"].items():
        torch.testing.assert_close(loaded["model"][key], tensor, rtol=0, atol=0)
    assert loaded["config"] == state["config"] and loaded["plan"] == state["plan"]
    assert (loaded["epoch"], loaded["step"], loaded["best_metric"]) == (3, 6, float("-inf"))
    assert torch.load(path, weights_only=True)["epoch"] == 3  # torch's own safe loader reads it


def test_saving_needs_the_required_keys(tmp_path: Path) -> None:
    state = small_state()
    del state["plan"], state["step"]
    with pytest.raises(ValueError, match="checkpoint state misses plan, step"):
        save_checkpoint(tmp_path / "c.pt", state)
    assert not any(tmp_path.iterdir())


def test_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_a_truncated_checkpoint_is_one_line(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", small_state())
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match=r"c\.pt: cannot read checkpoint \(") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_text("epoch: 3\n"), "cannot read checkpoint"),
        (lambda p: torch.save(torch.zeros(3), p), r"not a segmenter checkpoint \(missing keys\)"),
        (lambda p: torch.save({"model": {}, "epoch": 1}, p), "not a segmenter checkpoint"),
    ],
    ids=["text", "a tensor", "missing keys"],
)
def test_a_foreign_file_is_refused(tmp_path: Path, write: Any, message: str) -> None:
    path = tmp_path / "foreign.pt"
    write(path)
    with pytest.raises(InputError, match=rf"foreign\.pt: {message}"):
        load_checkpoint(path)


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.pt"
    torch.save({**small_state(), "format": FORMAT_VERSION + 1}, path)
    with pytest.raises(
        InputError, match=rf"checkpoint format {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"
    ):
        load_checkpoint(path)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_VERSION, **small_state(), "extra": WritesAMarker(marker)}, path)
    with pytest.raises(InputError, match=r"evil\.pt: cannot read checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    # the file is what it claims: an unrestricted load runs its code
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_find_checkpoint_falls_back_from_best_to_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    last = save_checkpoint(run / "checkpoints" / "last.pt", small_state())
    assert find_checkpoint(run) == last  # no best.pt yet
    best = save_checkpoint(run / "checkpoints" / "best.pt", small_state())
    assert find_checkpoint(run) == best
    assert find_checkpoint(run, "last") == last
    last.unlink()
    with pytest.raises(InputError, match=r"run: no checkpoint in .*checkpoints \(train a model"):
        find_checkpoint(run, "last")  # only best is asked for with a fallback


def test_find_checkpoint_needs_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing: run folder not found"):
        find_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no checkpoint in"):
        find_checkpoint(tmp_path / "empty")
