"""Several trainings at once, one per device: ``crossval --devices`` (nnU-Net's advice for
cross-validation on a multi-GPU machine: one fold per GPU).

Each training is a ``python -m segmenter train --config CFG --fold K --out RUN`` process of its
own (``--resume`` when ``RUN`` holds a ``last.pt``), so it is the same training that a sequential
run does, with its own run folder, ``train.log`` and lock. A device is

- a CUDA index (``0``, ``1``...): the process sees only that GPU (``CUDA_VISIBLE_DEVICES``) and
  trains with ``train.device=cuda``;
- ``cpu``: the process trains on the CPU; with several ``cpu`` devices each gets an equal share
  of the cores (``train.threads``) unless the config sets the threads itself.

A device runs one training at a time; the next one waiting starts when a device frees. A
process's console output goes to ``RUN.console.log`` beside its run folder. A stop signal
(SIGINT, SIGTERM) is passed on to every running training, which saves its progress and stops at
its next safe point; the call then raises :class:`~segmenter.errors.Interrupted` (a rerun resumes
every fold). A training that fails lets the running ones finish, starts no more and raises
one line naming it and its console log.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from segmenter.errors import InputError, Interrupted, TrainingFailed
from segmenter.interrupts import stop_requests

#: Seconds between checks of the running trainings.
POLL_S = 0.5


@dataclass(frozen=True)
class TrainingTask:
    """One training to run: the config file, the fold and the run folder."""

    config: Path
    fold: int | str
    run: Path


@dataclass(frozen=True)
class TaskResult:
    """A finished training: its epochs, steps and minutes (from its ``metrics.csv``)."""

    task: TrainingTask
    epochs: int
    steps: int
    minutes: float


def parse_devices(devices: Sequence[str]) -> list[str]:
    """``cpu`` or CUDA indices, checked.

    Raises:
        InputError: an entry that is neither, or a CUDA index without that GPU.
    """
    if not devices:
        raise InputError("--devices needs at least one device (a CUDA index or cpu)")
    out = []
    for d in devices:
        text = str(d).strip().lower()
        if text == "cpu":
            out.append(text)
            continue
        if not text.isdigit():
            raise InputError(f"--devices: '{d}' is neither a CUDA index nor cpu")
        out.append(text)
    gpus = [int(d) for d in out if d != "cpu"]
    if gpus:
        import torch

        n = torch.cuda.device_count()
        missing = [g for g in gpus if g >= n]
        if missing:
            raise InputError(f"--devices: CUDA device {missing[0]} not present ({n} GPU(s) here)")
    return out


def _command(task: TrainingTask, device: str, cpu_threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "segmenter", "train", "--config", str(task.config),
           "--fold", str(task.fold), "--out", str(task.run)]  # fmt: skip
    if (task.run / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    if device == "cpu":
        cmd += ["--set", "train.device=cpu"]
        if cpu_threads is not None:
            cmd += ["--set", f"train.threads={cpu_threads}"]
    else:
        cmd += ["--set", "train.device=cuda"]
    return cmd


def _env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)  # never a data-parallel rank, whatever launched us
    if device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def _result(task: TrainingTask) -> TaskResult:
    with open(task.run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return TaskResult(task, int(last["epoch"]), int(last["step"]), float(last["elapsed_s"]) / 60.0)


def console_log(task: TrainingTask) -> Path:
    """Where a task's console output goes: ``RUN.console.log`` beside the run folder."""
    return task.run.with_name(task.run.name + ".console.log")


def run_parallel(
    tasks: Sequence[TrainingTask], devices: Sequence[str], *, threads_set: bool
) -> list[TaskResult]:
    """Run ``tasks`` on ``devices`` (module docstring), in the order given.

    Args:
        tasks: the trainings.
        devices: checked devices (:func:`parse_devices`).
        threads_set: whether the config fixes ``train.threads`` (then the CPU share is not set).

    Returns:
        One result per task, in the order of ``tasks``.

    Raises:
        Interrupted: a stop signal arrived; every running training saved its progress.
        TrainingFailed: a training failed (the first one, with its console log).
    """
    n_cpu = sum(d == "cpu" for d in devices)
    cpu_threads = None if threads_set or n_cpu == 0 else max(1, (os.cpu_count() or 1) // n_cpu)
    waiting = list(tasks)
    running: dict[str, tuple[TrainingTask, subprocess.Popen[bytes]]] = {}
    failed: list[tuple[TrainingTask, int]] = []
    free = [str(i) + ":" + d for i, d in enumerate(devices)]  # slot names keep equal devices apart
    with stop_requests() as stop:
        while waiting or running:
            while waiting and free and not stop.requested and not failed:
                slot = free.pop(0)
                device = slot.split(":", 1)[1]
                task = waiting.pop(0)
                task.run.parent.mkdir(parents=True, exist_ok=True)
                log_file = open(console_log(task), "ab")  # the child keeps its own handle
                proc = subprocess.Popen(
                    _command(task, device, cpu_threads), stdout=log_file,
                    stderr=subprocess.STDOUT, env=_env(device),
                )  # fmt: skip
                log_file.close()
                running[slot] = (task, proc)
            if stop.requested:
                for _, proc in running.values():
                    if proc.poll() is None:
                        proc.send_signal(stop.signum or signal.SIGTERM)
                waiting.clear()
            time.sleep(POLL_S)
            for slot, (task, proc) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[slot]
                free.append(slot)
                if code != 0 and not stop.requested:
                    failed.append((task, code))
                    waiting.clear()  # start no more; the running ones finish
    if stop.requested:
        raise Interrupted(
            f"stopped by {stop.name}: the trainings saved their progress",
            signum=stop.signum or signal.SIGTERM,
            folder=tasks[0].run.parent if tasks else Path("."),
        )
    if failed:
        task, code = failed[0]
        raise TrainingFailed(
            f"training of fold {task.fold} into {task.run} failed (exit {code}); "
            f"see {console_log(task)}"
        )
    return [_result(task) for task in tasks]


__all__ = [
    "TaskResult",
    "TrainingTask",
    "console_log",
    "parse_devices",
    "run_parallel",
]
