"""Tests for segmenter.nn.distributed and data-parallel ``segmenter train`` on the CPU (gloo).

Two processes each: under ``torch.distributed.run`` (torchrun) on a free rendezvous port, or as
two plain processes with torchrun's variables set by hand, which lets a test signal or kill one
rank. Every process has a wall-clock bound and a collective timeout
(``SEGMENTER_DIST_TIMEOUT_S``), so a broken run fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ddp_worker import step_config, train_steps

from segmenter.cli import main
from segmenter.config import load_config
from segmenter.data.layout import load_dataset
from segmenter.errors import InputError
from segmenter.inference.predictor import load_predictor
from segmenter.nn import distributed
from segmenter.nn.distributed import SINGLE, Dist
from segmenter.preprocessing.pipeline import preprocess_dataset
from segmenter.preprocessing.spec import PreprocessingSpec
from segmenter.training import validation

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    """This checkout's package first on the path, one thread, a short collective timeout."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env |= {"OMP_NUM_THREADS": "1", distributed.TIMEOUT_VARIABLE: "60"}
    return env | extra


def _torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ranks(args: list[str], cwd: Path) -> list[subprocess.Popen]:
    """``python -m segmenter ARGS`` as ranks 0 and 1 of one run (torchrun's variables)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "segmenter", *args], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    """Each rank's exit code and stderr (a rank still running after ``timeout`` is killed)."""
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err += "\n(killed: still running)"
        out.append((p.returncode, err))
    return out


def _tiny(tiny_config: object, phantoms: Path, folder: Path, **changes: object) -> Path:
    base = {"train.threads": 1}
    return tiny_config(folder / "tiny.yaml", phantoms, base | changes)  # type: ignore[operator]


# ------------------------------------------------------------------------------- units


def test_the_environment_names_the_run() -> None:
    assert distributed.from_environment({}) == SINGLE and not SINGLE.active and SINGLE.chief
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", distributed.TIMEOUT_VARIABLE: "9"}
    dist = distributed.from_environment(env)
    assert dist == Dist(rank=2, world_size=4, local_rank=0, timeout_s=9.0)
    assert dist.active and not dist.chief
    with pytest.raises(InputError, match="bad torchrun environment"):
        distributed.from_environment({"WORLD_SIZE": "2", "RANK": "2"})


def test_the_global_batch_must_split_over_the_ranks() -> None:
    assert distributed.per_rank_batch(4, Dist(world_size=2)) == 2
    assert distributed.per_rank_batch(3, SINGLE) == 3
    with pytest.raises(InputError, match="batch_size 3 .* does not split over 2 ranks"):
        distributed.per_rank_batch(3, Dist(world_size=2))


def test_single_process_collectives_are_the_identity() -> None:
    t = torch.tensor([1.0, 2.0])
    assert SINGLE.sum_(t) is t and SINGLE.sum_with_grad(t) is t
    assert SINGLE.mean(1.5, torch.device("cpu")) == 1.5
    assert SINGLE.max_ints([0, 3], torch.device("cpu")) == [0, 3]


# ------------------------------------------------------------------ gradient equivalence


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "activation", "clip"),
    [
        ("focal_dice", "sigmoid", 12.0),
        ("focal_dice", "sigmoid", 0.01),
        ("dice_ce", "softmax", 12.0),
    ],  # fmt: skip
)
def test_two_ranks_of_one_sample_train_as_one_process_of_two(
    loss: str, activation: str, clip: float, tmp_path: Path
) -> None:
    # The same weights, the same two samples: DDP's gradient average and the batch-Dice
    # statistics summed over the ranks (fused sigmoid path; autograd softmax path) must give
    # the single-process batch-2 SGD steps; with clip 0.01 clipping acts, on the synchronised
    # gradients (clipping each rank's own would scale them apart).
    out = tmp_path / "ddp.pt"
    run = _torchrun([str(WORKER), str(out), loss, activation, str(clip)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    cfg = step_config(loss, activation, clip)
    weights, losses = train_steps(cfg, SINGLE)
    assert ddp["losses"] == pytest.approx(losses, rel=1e-5)
    for key, value in weights.items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-6)
    # the test can tell: per-sample Dice trains other weights than batch Dice
    per_sample = type(cfg)(**{**vars(cfg), "loss": type(cfg.loss)(**{
        **vars(cfg.loss), "batch_dice": False})})  # fmt: skip
    other, _ = train_steps(per_sample, SINGLE)
    assert any(not torch.allclose(other[k], weights[k], atol=1e-6) for k in weights)


# ------------------------------------------------------------------------ segmenter train


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("form", ["module", "console script"])
def test_torchrun_trains_one_run_that_rank_0_alone_writes(
    form: str, tiny_config: object, phantoms: Path, tmp_path: Path
) -> None:
    cfg = _tiny(tiny_config, phantoms, tmp_path)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", "--config", str(cfg), "--out", str(single)]) == 0
    script = (
        ["-m", "segmenter"]
        if form == "module"
        else [str(Path(sys.executable).parent / "segmenter")]
    )
    run = _torchrun([*script, "train", "--config", str(cfg), "--out", str(ddp)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(ddp) == _files(single)  # the same run folder, nothing from rank 1
    log = (ddp / "train.log").read_text()
    assert "distributed: world size 2 (gloo), 1 patches per rank of the global batch 2" in log
    assert "world size" not in (single / "train.log").read_text()
    assert run.stdout.count("run folder:") == 1  # one report, rank 0's
    state = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    assert (state["world_size"], state["step"]) == (2, 2)
    # the two validation cases were split over the ranks and gathered in case order
    assert "validated 2 cases over 2 ranks (1, 1 per rank)" in log
    assert _validation_dice(ddp) == pytest.approx(_recomputed_dice(ddp), abs=1e-6)


def _validation_dice(run: Path) -> dict[str, float]:
    summary = json.loads((run / "summary.json").read_text())
    return {c["case_id"]: c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]}


def _recomputed_dice(run: Path) -> dict[str, float]:
    """Each held-out case of ``run`` scored in one process from its ``best.pt``."""
    cfg = load_config(run / "config.yaml")
    predictor = load_predictor(run)
    held_out = json.loads((run / "splits.json").read_text())[0]["val"]
    dataset = load_dataset(cfg.data.dataset)
    cases = preprocess_dataset(
        [c for c in dataset.training if c.case_id in held_out],
        PreprocessingSpec.from_data(cfg.data), workers=1,
    )  # fmt: skip
    probs = validation.validation_probabilities(
        predictor.model, cases, cfg, predictor.plan, device=torch.device("cpu"), dtype=None
    )
    summary, _ = validation.score_cases(cases, probs, cfg)
    return {c["case_id"]: c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]}


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(
    tiny_config: object,
    phantoms: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _tiny(tiny_config, phantoms, tmp_path, **{"data.batch_size": 3})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: data.batch_size 3 (the global batch) does not split over 2 ranks: "
                   "use a multiple of 2"]  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_budget_stop_ends_both_ranks_after_the_same_step(
    tiny_config: object, phantoms: Path, tmp_path: Path
) -> None:
    # A budget shorter than one epoch: rank 0 decides after epoch 1 and every rank stops there.
    changes = {"train.epochs": 50, "train.max_minutes": 0.001}
    cfg = _tiny(tiny_config, phantoms, tmp_path, **changes)
    run = tmp_path / "run"
    results = _finish(_ranks(["-v", "train", "--config", str(cfg), "--out", str(run)], tmp_path))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    for rank, (_, err) in enumerate(results):
        assert f"rank {rank} of 2: training ended after step 2 (epoch 1)" in err
    assert "wall-clock budget" in (run / "train.log").read_text()
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2


@pytest.mark.slow
def test_killing_one_rank_ends_the_other_with_one_line(
    tiny_config: object, phantoms: Path, tmp_path: Path
) -> None:
    cfg = _tiny(tiny_config, phantoms, tmp_path, **{"train.epochs": 500})
    run = tmp_path / "run"
    procs = _ranks(["train", "--config", str(cfg), "--out", str(run)], tmp_path)
    deadline = time.monotonic() + 90
    while not (run / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run / "checkpoints" / "last.pt").exists(), "training never got going"
    procs[1].kill()
    killed = time.monotonic()
    (rc, err), _ = _finish(procs, timeout=60)
    assert time.monotonic() - killed < 60
    assert rc == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(lines) == 1 and "rank 0 of 2: another rank died or a collective timed out" in lines[0]
    )
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_and_the_run_resumes_exactly(
    tiny_config: object, phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # with dropout on: the resumed ranks draw the masks they would have drawn
    changes = {"train.epochs": 4, "train.val_every": 4, "model.dropout": 0.2}
    cfg = _tiny(tiny_config, phantoms, tmp_path, **changes)
    straight, part = tmp_path / "straight", tmp_path / "part"
    results = _finish(_ranks(["train", "--config", str(cfg), "--out", str(straight)], tmp_path))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:]
    procs = _ranks(["train", "--config", str(cfg), "--out", str(part)], tmp_path)
    while not (part / "checkpoints" / "last.pt").exists() and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # rank 1 alone: the ranks agree on the stop
    results = _finish(procs)
    assert [rc for rc, _ in results] == [143, 143], results[0][1][-2000:] + results[1][1][-2000:]
    stopped = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["step"] < 8 and stopped["world_size"] == 2
    # a plain (one-process) resume is refused in one line; two ranks continue exactly
    assert main(["train", "--resume", "--out", str(part)]) == 2
    assert "trained by 2 process(es), resumed with 1" in capsys.readouterr().err
    results = _finish(_ranks(["train", "--resume", "--out", str(part)], tmp_path))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:]
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (4, 8)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
