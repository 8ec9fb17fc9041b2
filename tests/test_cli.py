from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segmenter.cli import main
from segmenter.io import read_image, write_like


@pytest.fixture
def phantoms(tmp_path: Path) -> Path:
    code = main(
        ["synth", "--out", str(tmp_path), "--cases", "4", "--test-cases", "2", "--size", "32"]
    )
    assert code == 0
    return tmp_path / "Dataset900_Phantom"


def degrade(src: Path, dst: Path) -> None:
    """Copy label maps to ``dst`` as 'predictions' with the largest lesion of each removed."""
    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.nii.gz")):
        ref = read_image(path)
        pred = ref.array.copy()
        if pred.any():
            import cc3d

            labels = cc3d.connected_components(pred > 0, connectivity=26)
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            pred[labels == int(np.argmax(sizes))] = 0
        write_like(dst / path.name, pred, ref)


def test_synth_verify_evaluate_end_to_end(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(phantoms)]) == 0
    assert "ok" in capsys.readouterr().out
    degrade(phantoms / "labelsTs", tmp_path / "pred")
    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(phantoms / "labelsTs"),
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "recall" in printed and "pooled" in printed and "phantom_test_000" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2
    pooled = summary["lesion"]["pooled"]
    lesion_cases = [c for c in summary["metric_per_case"] if c["lesion"]["n_ref"] > 0]
    assert pooled["fn"] == len(lesion_cases)  # exactly the removed largest lesions are missed
    assert pooled["fp"] == 0
    assert (out / "lesions.csv").read_text().startswith("case_id,source,lesion_id")


def test_synth_same_seed_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        args = ["synth", "--out", str(tmp_path / name), "--cases", "2", "--size", "24"]
        assert main([*args, "--seed", "3"]) == 0
    files_a = sorted((tmp_path / "a").rglob("*.nii.gz"))
    assert files_a
    for fa in files_a:
        fb = tmp_path / "b" / fa.relative_to(tmp_path / "a")
        assert fa.read_bytes() == fb.read_bytes()


def test_verify_reports_problems_with_exit_2(
    phantoms: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (phantoms / "imagesTr" / "phantom_001_0001.nii.gz").unlink()
    assert main(["verify", str(phantoms)]) == 2
    out = capsys.readouterr().out
    assert "phantom_001_0001.nii.gz: missing channel 1" in out
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--pred", "/nonexistent/p", "--ref", "/nonexistent/r"], "folder not found"),
        (["verify", "/nonexistent/Dataset001_X"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.out + captured.err
    assert "Traceback" not in captured.err


def test_evaluate_corrupt_prediction_exit_2(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred = tmp_path / "pred"
    shutil.copytree(phantoms / "labelsTs", pred)
    victim = pred / "phantom_test_000.nii.gz"
    victim.write_bytes(victim.read_bytes()[:100])
    assert main(["evaluate", "--pred", str(pred), "--ref", str(phantoms / "labelsTs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "phantom_test_000.nii.gz: cannot read" in err
    assert not (pred / "summary.json").exists()


def test_usage_errors_exit_2_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert main(["evaluate", "--pred", "x"]) == 2  # --ref missing
    assert main(["evaluate", "--pred", "x", "--ref", "y", "--preset", "nope"]) == 2
    assert main(["synth", "--out", "x", "--cases", "0"]) == 2
    assert (
        main(["predict", "--model", "r", "--input", "i", "--output", "o", "--threshold", "1.2"])
        == 2
    )
    assert main(["demo", "--minutes", "-1"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_evaluate_does_not_import_torch() -> None:
    """``segmenter evaluate`` must start fast: the CLI path never imports torch."""
    code = (
        "import sys; from segmenter import cli; "
        "from segmenter.evaluation import evaluate, metrics; from segmenter.data import synthetic; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_full_disk_is_one_line_exit_1_and_the_previous_file_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import os

    from segmenter import atomic
    from segmenter.data.synthetic import PhantomSpec, write_dataset

    ds = write_dataset(tmp_path / "ds", 2, seed=0, spec=PhantomSpec(size=32))
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text("previous")

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(atomic.os, "replace", full)
    argv = ["evaluate", "--pred", str(ds / "labelsTr"), "--ref", str(ds / "labelsTr"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No space left on device; free some space and rerun" in lines[0]
    assert "Traceback" not in err
    assert (out / "summary.json").read_text() == "previous"
    assert sorted(os.listdir(out)) == ["summary.json"]  # no temporary file left behind


def test_python_dash_m_segmenter_is_the_cli() -> None:
    run = subprocess.run([sys.executable, "-m", "segmenter", "verify", "/nonexistent/ds"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2
    assert "/nonexistent/ds: dataset folder not found" in run.stdout + run.stderr


def test_a_rank_of_a_data_parallel_run_exits_with_its_code_and_its_output_flushed() -> None:
    env = {**os.environ, "WORLD_SIZE": "2"}  # verify is not distributed: only the exit path is
    run = subprocess.run([sys.executable, "-m", "segmenter", "verify", "/nonexistent/ds"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 2
    assert "/nonexistent/ds: dataset folder not found" in run.stdout + run.stderr


#: A rank whose stopped run takes a minute to release (its gloo group after a peer died).
_SLOW_TEARDOWN = """
import sys, time
from pathlib import Path
import segmenter.cli as cli
from segmenter.errors import Interrupted

class SlowToRelease:
    def __del__(self):
        time.sleep(60)

def stopped_run(args):
    held = SlowToRelease()  # held by the frame, released with the exception
    raise Interrupted("stopped by SIGTERM in epoch 2", signum=15, folder=Path("run"))

cli._cmd_verify = stopped_run
sys.argv = ["segmenter", "verify", "ds"]
cli.entry()
"""


def test_a_rank_exits_once_it_reported_without_releasing_the_stopped_run() -> None:
    env = {**os.environ, "WORLD_SIZE": "2"}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", _SLOW_TEARDOWN], capture_output=True,
                         text=True, env=env, timeout=50)  # fmt: skip
    assert time.monotonic() - start < 30, "the rank waited for the stopped run's teardown"
    assert run.returncode == 143
    assert "stopped by SIGTERM in epoch 2" in run.stderr
