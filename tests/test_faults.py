"""Training under faults: SIGINT and SIGTERM stop ``train`` and ``crossval`` at a safe point with
one line and exit 130 or 143, and ``--resume`` then ends where an uninterrupted run ends; SIGKILL
at chosen moments, three times in a row, loses nothing either, and leaves nothing behind.

Faults are injected with ``scripts/fault_matrix.py``'s hooks (the N-th backward pass, validation
case or write onto a file), in this process for the catchable signals and in a child process
for SIGKILL and for a signal sent to a whole process group. Every comparison is against one
uninterrupted run of the same config: checkpoint weights and counters, ``metrics.csv`` without
its timing columns, ``summary.json`` and ``plan.json``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tiny import load_script

from segmenter.cli import main
from segmenter.locking import LOCK_FILE, FolderLock

ROOT = Path(__file__).resolve().parents[1]
#: Two epochs of two steps (steps 1-2 are epoch 1), each validated on the fold's 2 cases.
CHANGES = {"train.epochs": 2, "train.iterations_per_epoch": 2, "data.batch_size": 1}


def load_fault_matrix() -> ModuleType:
    """``scripts/fault_matrix.py`` as a module (its fault hooks and comparisons)."""
    return load_script("fault_matrix")


fm = load_fault_matrix()


@pytest.fixture(scope="session")
def config_for(phantoms: Path, tiny_config: Callable[..., Path]) -> Callable[..., Path]:
    """``config_for(folder, workers, dropout=0.0)``: the config of :data:`CHANGES` for the
    shared phantoms with that many DataLoader workers and that dropout, in ``folder``."""

    def write(folder: Path, workers: int, dropout: float = 0.0) -> Path:
        changes = {**CHANGES, "data.num_workers": workers, "model.dropout": dropout}
        return tiny_config(folder / "c.yaml", phantoms, changes)

    return write


@pytest.fixture(scope="module")
def reference(
    config_for: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """``reference(workers, dropout=0.0)``: the uninterrupted run of :data:`CHANGES` with that
    many DataLoader workers and that dropout (trained on first use)."""
    runs: dict[tuple[int, float], Path] = {}

    def get(workers: int, dropout: float = 0.0) -> Path:
        if (workers, dropout) not in runs:
            root = tmp_path_factory.mktemp(f"reference{workers}")
            config = config_for(root, workers, dropout)
            assert main(["train", "--config", str(config), "--out", str(root / "run")]) == 0
            runs[workers, dropout] = root / "run"
        return runs[workers, dropout]

    return get


def run_with_faults(monkeypatch: pytest.MonkeyPatch, faults: list[str], argv: list[str]) -> int:
    """``segmenter ARGV`` in this process with ``faults`` injected (undone afterwards)."""
    with monkeypatch.context() as patch:
        fm.install([fm.Fault.parse(f) for f in faults], None, patch=patch.setattr)
        return main(argv)


UNVALIDATED = "in epoch 1 of 2, after step 2 of 4, before its validation"
STOPS = [
    # faults, (workers, dropout), exit code, where the message says it stopped, steps done in
    # the unfinished epoch
    (["SIGTERM@backward#1"], (0, 0.0), 143, "in epoch 1 of 2, after step 1 of 4", 1),
    (["SIGINT@backward#2"], (0, 0.0), 130, UNVALIDATED, 2),  # the epoch's last step
    (["SIGTERM@validation#1"], (0, 0.0), 143, UNVALIDATED, 2),  # before the second case
    (["SIGTERM@write:metrics.csv#1"], (0, 0.0), 143, "after epoch 1 of 2 (step 2 of 4)", 0),
    (["SIGINT@backward#3"], (2, 0.0), 130, "in epoch 2 of 2, after step 3 of 4", 1),
    (["SIGTERM@backward#3"], (0, 0.3), 143, "in epoch 2 of 2, after step 3 of 4", 1),  # RNG used
]  # fmt: skip


@pytest.mark.parametrize(("faults", "settings", "code", "where", "done"), STOPS)
def test_a_stop_signal_saves_the_progress_at_a_safe_point_and_resume_ends_as_without_it(
    faults: list[str],
    settings: tuple[int, float],
    code: int,
    where: str,
    done: int,
    config_for: Callable[..., Path],
    reference: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--config", str(config_for(tmp_path, *settings)), "--out", str(run)]
    name = signal.Signals(code - 128).name
    sigint = signal.getsignal(signal.SIGINT)  # ignored when the tests were started in background
    assert run_with_faults(monkeypatch, faults, argv) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stopped by {name} {where}; progress saved in {run}/checkpoints/last.pt; "
        f"resume with: segmenter train --resume --out {run}"
    )
    assert signal.getsignal(signal.SIGINT) is sigint  # handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (
        saved["epoch_progress"]["steps"] == done and len(saved["epoch_progress"]["losses"]) == done
    )
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert fm.differences(run, reference(*settings)) == []
    assert fm.leftovers(run) == []


def test_a_second_signal_while_last_pt_is_written_changes_nothing(
    config_for: Callable[..., Path],
    reference: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--config", str(config_for(tmp_path, 0)), "--out", str(run)]
    faults = ["SIGINT@backward#1", "SIGTERM@write:last.pt#1"]  # SIGTERM lands mid-save
    assert run_with_faults(monkeypatch, faults, argv) == 130  # the first signal is reported
    assert "stopped by SIGINT in epoch 1 of 2, after step 1 of 4" in capsys.readouterr().err
    assert fm.leftovers(run) == []
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch_progress"]["steps"]) == (1, 1)
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert fm.differences(run, reference(0)) == []


def test_crossval_stopped_by_sigterm_tells_to_rerun_and_the_rerun_resumes_the_fold(
    config_for: Callable[..., Path],
    reference: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "cv"
    argv = ["crossval", "--config", str(config_for(tmp_path, 0)), "--out", str(out),
            "--folds", "0"]  # fmt: skip
    assert run_with_faults(monkeypatch, ["SIGTERM@backward#3"], argv) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM in epoch 2 of 2, after step 3 of 4; progress saved in "
        f"{out}/fold_0/checkpoints/last.pt; resume with: segmenter {' '.join(argv)}"
    )
    assert not (out / "summary.json").exists()
    assert main(argv) == 0
    assert fm.differences(out / "fold_0", reference(0)) == []
    assert fm.leftovers(out) == []


def run_child(faults: list[str], argv: list[str], **kwargs: object) -> object:
    """``segmenter ARGV`` in a child process (this checkout's package) with ``faults``."""
    return fm.run_child([*(f"--fault={f}" for f in faults), "--", *argv], **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_in_a_step_in_validation_and_mid_write_then_resume_loses_nothing(
    workers: int, config_for: Callable[..., Path], reference: Callable[..., Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    fresh = ["train", "--config", str(config_for(tmp_path, workers)), "--out", str(run)]
    resume = ["train", "--resume", "--out", str(run)]
    first = run_child(["kill@backward#2"], fresh)  # in epoch 1's second (last) step
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert f"segmenter from {ROOT / 'segmenter'}" in first.stderr
    assert (run / LOCK_FILE).is_file()
    with FolderLock(run, "test"):  # at once: no orphaned worker holds the folder
        pass
    # resumed from scratch (no last.pt yet): killed in epoch 1's validation, second case
    assert run_child(["kill@validation#2"], fresh).returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "last.pt").exists()
    # epoch 1 saved; killed writing epoch 2's last.pt, half of it on disk
    assert run_child(["kill@write:last.pt#2"], fresh).returncode == -signal.SIGKILL
    (stale,) = fm.leftovers(run)
    assert stale.startswith("checkpoints/.last.pt.")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    done = run_child([], resume)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"removed 1 temporary file(s) a killed run left: {stale}" in done.stderr
    assert fm.differences(run, reference(workers)) == []
    assert fm.leftovers(run) == []


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_stops_training_with_workers_cleanly(
    config_for: Callable[..., Path], reference: Callable[..., Path], tmp_path: Path
) -> None:
    # As a terminal's Ctrl-C or a batch system's time limit: the workers get it too, and must
    # leave the stop to the main process (they would die under it otherwise).
    run, go = tmp_path / "run", tmp_path / "go"
    argv = ["train", "--config", str(config_for(tmp_path, 2)), "--out", str(run)]
    stopped = run_child(["wait@backward#1"], argv, go=go, group_signal=signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert stopped.last_line.startswith("stopped by SIGTERM in epoch 1 of 2, after step 1 of 4;")
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert fm.differences(run, reference(2)) == []


def test_a_last_pt_from_before_mid_epoch_stops_still_resumes_exactly(
    config_for: Callable[..., Path], reference: Callable[..., Path], tmp_path: Path
) -> None:
    from segmenter.config import load_config
    from segmenter.training.loop import fit

    run = tmp_path / "run"
    fit(load_config(config_for(tmp_path, 0)), run, progress=False,
        should_stop=lambda epoch: epoch == 1)  # fmt: skip
    last = run / "checkpoints" / "last.pt"
    old = torch.load(last, weights_only=True)
    del old["epoch_progress"]  # as written before the key existed: an epoch boundary
    torch.save(old, last)
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert fm.differences(run, reference(0)) == []
