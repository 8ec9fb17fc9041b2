"""Tests for segmenter.locking: a second process on the same output folder is refused at once,
and a killed holder leaves nothing stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segmenter.cli import main
from segmenter.errors import InputError
from segmenter.locking import LOCK_FILE, FolderLock


def test_a_held_folder_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    with FolderLock(tmp_path / "run", "train"):
        with pytest.raises(InputError, match=r"run: in use by segmenter train \(pid \d+"):
            with FolderLock(tmp_path / "run", "predict"):
                pass
    with FolderLock(tmp_path / "run", "predict"):  # released on exit
        pass


def test_a_killed_holder_leaves_the_folder_free(tmp_path: Path) -> None:
    holder = textwrap.dedent(f"""
        import os, signal
        from segmenter.locking import FolderLock
        lock = FolderLock({str(tmp_path)!r}, "train").__enter__()
        print("held", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True)
    assert run.returncode == -9 and "held" in run.stdout
    assert (tmp_path / LOCK_FILE).is_file()  # the file stays, the lock does not
    with FolderLock(tmp_path, "train"):
        pass


def test_a_killed_holders_forked_children_do_not_keep_the_folder_locked(tmp_path: Path) -> None:
    # A DataLoader worker outlives a SIGKILLed trainer by seconds; it must not hold the lock.
    holder = textwrap.dedent(f"""
        import os, signal, sys, time
        from segmenter.locking import FolderLock
        lock = FolderLock({str(tmp_path)!r}, "train").__enter__()
        child = os.fork()
        if child == 0:  # lets go of the test's pipes, then lingers
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    orphan = int(run.stdout)
    try:
        assert run.returncode == -9
        os.kill(orphan, 0)  # the forked child still runs
        with FolderLock(tmp_path, "train"):
            pass
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_commands_on_a_folder_in_use_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{dataset: {tmp_path / 'missing'}}}\n")
    out = tmp_path / "busy"
    with FolderLock(out, "train"):
        assert main(["crossval", "--config", str(config), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {out}: in use by {(out / LOCK_FILE).read_text().strip()}; "
                       "wait for it to finish or choose another output folder"]  # fmt: skip


def test_train_and_a_folder_predict_refuse_a_folder_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from segmenter.data.synthetic import PhantomSpec, write_dataset

    dataset = write_dataset(tmp_path / "ds", 3, seed=0, spec=PhantomSpec(size=32), n_test=1)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{dataset: {dataset}}}\ntrain: {{n_folds: 3}}\n")
    run = tmp_path / "run"
    with FolderLock(run, "crossval"):
        assert main(["train", "--config", str(config), "--out", str(run)]) == 2
    assert "in use by segmenter crossval" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    fixture = Path(__file__).parent / "fixtures" / "run_format_v0"
    out = tmp_path / "pred"
    with FolderLock(out, "predict"):
        argv = ["predict", "--model", str(fixture), "--input", str(fixture / "input"),
                "--output", str(out), "--device", "cpu"]  # fmt: skip
        assert main(argv) == 2
    assert "in use by segmenter predict" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
