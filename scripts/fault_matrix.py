"""Fault matrix: run ``segmenter`` under injected faults and print what happened, case by case.

Each case is a function of a :class:`Context` returning one :class:`Row`: the fault, the command,
what happened, whether it was handled (the documented exit code and message, a resume that
finishes) and whether data was lost (the run's final weights, ``metrics.csv`` without its timing
columns, ``summary.json`` and ``plan.json`` differ from an uninterrupted run's, a temporary file
was left behind, or a resume was refused). Other fault families add their functions to
:data:`CASES`. Exits 0 only when every row is handled.

Training faults (tiny phantoms, size 32; a couple of minutes on 2 cores):

- SIGINT or SIGTERM after an optimiser step, during validation, to the whole process group with
  DataLoader workers, and a second signal while ``last.pt`` is written: exit 130 or 143 with one
  line, then ``--resume`` (``crossval``: rerun) finishes with the uninterrupted run's results;
- SIGKILL three times in a row at moments drawn from ``--seed`` (in a backward pass, in
  validation, while ``last.pt`` is written, half of it on disk), then ``--resume`` until done,
  with ``data.num_workers`` 0 and 2.

Prediction faults: ``predict`` of a folder SIGKILLed while its third mask is written (half of
it on disk), then ``predict --resume``: the masks written before are kept, the rest predicted,
every mask is an uninterrupted predict's and no temporary file is left.

Faults are injected in a child process (``child`` below) by patching it before ``segmenter.cli``
runs: a moment is "the N-th backward pass", "the N-th validation case", "the N-th write onto a
file named NAME" (just before the atomic rename), so a kill lands where it is meant to, not by
timing luck::

    python scripts/fault_matrix.py [--seed 0] [--workdir DIR]
    python scripts/fault_matrix.py child [--fault SPEC ...] [--go FILE] -- SEGMENTER-ARGS

``SPEC`` is ``ACTION@MOMENT#N``: ``ACTION`` ``kill`` (SIGKILL), a signal name (``SIGTERM``,
``SIGINT``: sent to itself), or ``wait`` (print ``FAULT READY`` to stderr and wait for ``--go``
to exist, for a parent to signal); ``MOMENT`` ``backward``, ``validation`` or ``write:NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The tiny training every case runs: 2 epochs of 2 steps on 32^3 patches, validated every
#: epoch on the fold's 2 held-out cases.
TRAIN_SETTINGS: dict[str, Any] = {
    "data": {"patch_size": [32, 32, 32], "num_workers": 0, "batch_size": 1},
    "model": {"depth": 3, "base_filters": 4, "max_filters": 16},
    "train": {"epochs": 2, "iterations_per_epoch": 2, "val_every": 1, "n_folds": 3,
              "precision": "fp32", "threads": 2},
    "inference": {"sw_batch_size": 1, "tta": False},
}  # fmt: skip
#: ``metrics.csv`` columns that are timings, not results.
TIMING_COLUMNS = ("epoch_s", "data_wait_s", "elapsed_s")
#: Keys of JSON outputs that are timings.
TIMING_KEYS = ("seconds", "seconds_per_case", "minutes")
READY = "FAULT READY"
CHILD_TIMEOUT_S = 300


# ------------------------------------------------------------------------- the child side


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``action`` at the ``count``-th ``moment`` (see the module docstring).

    Attributes:
        action: ``kill``, a signal name, or ``wait``.
        moment: ``backward``, ``validation`` or ``write``.
        count: which occurrence of the moment (1-based, counted from the process start).
        target: for ``write``, the file name whose write is hit.
    """

    action: str
    moment: str
    count: int
    target: str = ""

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """``ACTION@MOMENT#N``, e.g. ``kill@write:last.pt#2``."""
        action, _, rest = spec.partition("@")
        where, _, count = rest.rpartition("#")
        moment, _, target = where.partition(":")
        if moment not in ("backward", "validation", "write") or not count.isdigit():
            raise ValueError(f"bad fault {spec!r}: expected ACTION@MOMENT#N")
        if action not in ("kill", "wait") and not hasattr(signal.Signals, action):
            raise ValueError(f"bad fault {spec!r}: unknown action {action!r}")
        return cls(action, moment, int(count), target)

    def __str__(self) -> str:
        where = f"{self.moment}:{self.target}" if self.target else self.moment
        return f"{self.action}@{where}#{self.count}"


def act(fault: Fault, go: Path | None, tmp: Path | None = None) -> None:
    """Do what ``fault`` says, now (``tmp``: the temporary file of a write being hit)."""
    if fault.action == "kill":
        if tmp is not None:  # the write cut short: half of the file on disk
            os.truncate(tmp, tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "wait":
        print(READY, file=sys.stderr, flush=True)
        deadline = time.monotonic() + 60
        while go is not None and not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        os.kill(os.getpid(), signal.Signals[fault.action])
        time.sleep(0.05)  # delivered and handled in the middle of the moment


def install(
    faults: Sequence[Fault], go: Path | None, patch: Callable[[Any, str, Any], None] = setattr
) -> None:
    """Patch this process so that each fault fires at its moment (``patch``: how to set an
    attribute; a test passes ``monkeypatch.setattr`` to have it undone)."""
    import torch

    from segmenter.training import validation

    counts = {"backward": 0, "validation": 0}
    counts.update({f"write:{f.target}": 0 for f in faults if f.moment == "write"})

    def hit(moment: str, tmp: Path | None = None) -> None:
        counts[moment] += 1
        for f in faults:
            key = f"write:{f.target}" if f.moment == "write" else f.moment
            if key == moment and f.count == counts[moment]:
                act(f, go, tmp)

    backward, predict, replace = torch.Tensor.backward, validation.predict_logits, os.replace

    def hooked_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        backward(self, *args, **kwargs)
        hit("backward")  # gradients computed, the optimiser step not yet taken

    def hooked_predict(*args: Any, **kwargs: Any) -> Any:
        hit("validation")
        return predict(*args, **kwargs)

    def hooked_replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if f"write:{Path(dst).name}" in counts:
            hit(f"write:{Path(dst).name}", Path(src))
        replace(src, dst, **kwargs)

    patch(torch.Tensor, "backward", hooked_backward)
    patch(validation, "predict_logits", hooked_predict)
    patch(os, "replace", hooked_replace)


def child(argv: Sequence[str]) -> int:
    """``child [--fault SPEC ...] [--go FILE] -- SEGMENTER-ARGS``: run the CLI with faults."""
    parser = argparse.ArgumentParser(prog="fault_matrix.py child")
    parser.add_argument("--fault", action="append", default=[], type=Fault.parse)
    parser.add_argument("--go", type=Path, help="file whose creation ends a wait")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.go is None and any(f.action == "wait" for f in args.fault):
        parser.error("a wait needs --go FILE")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    import segmenter
    from segmenter.cli import main

    print(f"segmenter from {Path(segmenter.__file__).parent}", file=sys.stderr, flush=True)
    install(args.fault, args.go)
    return main(command)


# ------------------------------------------------------------------------ the parent side


@dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
        fault: what was done to the process.
        command: the commands run.
        happened: what the process did (exit codes, the message, what the resume did).
        handled: the documented behaviour happened, and nothing was lost.
        data_lost: 1 when results differ from an uninterrupted run or files were left behind.
    """

    fault: str
    command: str
    happened: str
    handled: bool
    data_lost: int


@dataclass(frozen=True)
class Outcome:
    """A finished child: its exit code (negative: killed by that signal) and its stderr."""

    returncode: int
    stderr: str

    @property
    def last_line(self) -> str:
        """The last line of stderr (the CLI's final message)."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


@dataclass
class Context:
    """What the cases share: a work folder, the phantoms, the seeded draws, reference runs.

    Attributes:
        root: the work folder.
        dataset: the phantom dataset.
        rng: the draws of the random moments (``--seed``).
        references: uninterrupted runs by settings, trained on first use.
    """

    root: Path
    dataset: Path
    rng: random.Random
    references: dict[str, Path] = field(default_factory=dict)

    def config(self, name: str, changes: dict[str, Any] | None = None) -> Path:
        """A YAML config of :data:`TRAIN_SETTINGS` plus dotted ``changes``."""
        import yaml

        values = json.loads(json.dumps(TRAIN_SETTINGS))
        values["data"]["dataset"] = str(self.dataset)
        for key, value in (changes or {}).items():
            section, option = key.split(".")
            values[section][option] = value
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        return path

    def reference(self, changes: dict[str, Any] | None = None, command: str = "train") -> Path:
        """The output of an uninterrupted ``train`` (or ``crossval``) with ``changes``."""
        key = json.dumps([command, changes or {}], sort_keys=True)
        if key not in self.references:
            name = f"reference_{len(self.references)}"
            config, out = self.config(name, changes), self.root / name
            outcome = run_here([command, "--config", str(config), "--out", str(out)])
            if outcome.returncode != 0:
                raise RuntimeError(f"the reference run failed:\n{outcome.stderr[-2000:]}")
            self.references[key] = out
        return self.references[key]


def run_child(
    args: Sequence[str], *, go: Path | None = None, group_signal: signal.Signals | None = None
) -> Outcome:
    """Run ``fault_matrix.py child ARGS`` with this checkout's ``segmenter``, in a process group
    of its own; with ``group_signal``, send that to the whole group once the child is ready."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "child"]
    cmd += [*(["--go", str(go)] if go is not None else []), *args]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "stderr"
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)  # fmt: skip
        try:
            if group_signal is not None:
                _signal_when_ready(proc, log, group_signal, go)
            proc.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return Outcome(proc.returncode, log.read_text())


def run_here(argv: Sequence[str]) -> Outcome:
    """``segmenter ARGV`` in this process (no fault: a reference run, a resume), its stderr
    captured; the log records still reach each run's ``train.log``."""
    from segmenter.cli import main

    root = logging.getLogger()
    if not root.handlers:  # the CLI's own set-up would print every record here
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.INFO)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return Outcome(code, err.getvalue())


def _signal_when_ready(
    proc: subprocess.Popen[bytes], log: Path, signum: signal.Signals, go: Path | None
) -> None:
    """Wait for the child's ``FAULT READY``, signal its process group, then let it go on."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if READY in log.read_text():
            os.killpg(proc.pid, signum)
            if go is not None:
                go.touch()
            return
        time.sleep(0.02)


def read_metrics(run: Path) -> list[dict[str, str]]:
    """``metrics.csv`` without its timing columns."""
    rows = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def comparable(value: Any, folder: Path) -> Any:
    """A JSON value with the :data:`TIMING_KEYS` left out and ``folder`` in paths written as
    ``RUN``, at any depth (what two runs in different folders must have alike)."""
    if isinstance(value, dict):
        return {k: comparable(v, folder) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [comparable(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(str(folder), "RUN")
    return value


def same_json(name: str, run: Path, reference: Path) -> bool:
    """Whether the JSON file ``name`` says the same in both folders (:func:`comparable`)."""
    a, b = (comparable(json.loads((r / name).read_text()), r) for r in (run, reference))
    return a == b


def differences(run: Path, reference: Path) -> list[str]:
    """What differs between a run folder and an uninterrupted one: the checkpoints' weights and
    counters, ``metrics.csv`` (no timings), ``summary.json``, ``plan.json``; empty if nothing."""
    names = ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv", "summary.json",
             "plan.json")  # fmt: skip
    missing = [f"no {n}" for n in names if not (run / n).is_file()]
    if missing:
        return missing
    found = [f"{n} weights" for n in ("last", "best") if not same_checkpoint(run, reference, n)]
    if read_metrics(run) != read_metrics(reference):
        found.append("metrics.csv")
    return found + [n for n in ("summary.json", "plan.json") if not same_json(n, run, reference)]


def same_checkpoint(run: Path, reference: Path, name: str) -> bool:
    """Whether ``checkpoints/NAME.pt`` holds the same epoch, step and weights (to float
    tolerance) in both runs."""
    import torch

    a, b = (torch.load(r / "checkpoints" / f"{name}.pt", weights_only=True)
            for r in (run, reference))  # fmt: skip
    return (
        (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        and a["model"].keys() == b["model"].keys()
        and all(torch.allclose(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7)
                for k in a["model"])
    )  # fmt: skip


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes under ``folder``."""
    from segmenter.atomic import TEMPORARY_NAME

    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if TEMPORARY_NAME.match(p.name))  # fmt: skip


def verdict(run: Path, reference: Path) -> tuple[str, int]:
    """What was lost (``"nothing lost"``, or the differences and leftovers) and 0 or 1."""
    lost = differences(run, reference) + [f"left {p}" for p in leftovers(run)]
    return ("nothing lost" if not lost else "lost: " + ", ".join(lost)), int(bool(lost))


# -------------------------------------------------------------------------------- cases


def stop_signal_case(
    ctx: Context,
    name: str,
    faults: Sequence[str],
    *,
    workers: int = 0,
    group_signal: signal.Signals | None = None,
) -> Row:
    """``train`` with ``faults``; expect 128 + signal and the one-line message, then
    ``--resume`` to finish with the uninterrupted run's results."""
    changes = {"data.num_workers": workers}
    reference = ctx.reference(changes)
    run, go = ctx.root / name, ctx.root / f"{name}.go"
    config = ctx.config(name, changes)
    args = [f"--fault={f}" for f in faults]
    first = run_child([*args, "--", "train", "--config", str(config), "--out", str(run)], go=go,
                      group_signal=group_signal)  # fmt: skip
    signum = group_signal or signal.Signals[Fault.parse(faults[0]).action]
    line = first.last_line
    told = line.startswith(f"stopped by {signum.name}") and (
        f"resume with: segmenter train --resume --out {run}" in line
    )
    resumed = run_here(["train", "--resume", "--out", str(run)])
    lost, lost_flag = verdict(run, reference)
    happened = f"exit {first.returncode}: {line!r}; --resume: exit {resumed.returncode}, {lost}"
    handled = first.returncode == 128 + signum and told and resumed.returncode == 0
    where = "whole process group" if group_signal else "the process"
    return Row(f"{signum.name} to {where} ({', '.join(faults)}), workers {workers}",
               "train; train --resume", happened, handled and not lost_flag, lost_flag)  # fmt: skip


def remaining_moments(run: Path, n_val: int) -> dict[str, int]:
    """How many of each moment a resumed run of :data:`TRAIN_SETTINGS` still goes through
    (at least; the final threshold tuning's validation and checkpoint writes not counted)."""
    import torch

    t = TRAIN_SETTINGS["train"]
    last = run / "checkpoints" / "last.pt"
    epoch, done = 0, 0
    if last.is_file():
        ckpt = torch.load(last, weights_only=True)
        epoch, done = ckpt["epoch"], ckpt.get("epoch_progress", {}).get("steps", 0)
    epochs_left = t["epochs"] - epoch
    return {
        "backward": epochs_left * t["iterations_per_epoch"] - done,
        "validation": epochs_left * n_val,
        "write:last.pt": epochs_left,
    }


def lock_is_free(folder: Path) -> bool:
    """Whether ``folder``'s lock can be taken at once (a killed holder must not keep it)."""
    from segmenter.errors import InputError
    from segmenter.locking import FolderLock

    try:
        with FolderLock(folder, "fault_matrix"):
            return True
    except InputError:
        return False


def resume_command(run: Path, fresh: list[str]) -> list[str]:
    """``train --resume`` once ``last.pt`` exists; before that, the first command again."""
    if (run / "checkpoints" / "last.pt").is_file():
        return ["train", "--resume", "--out", str(run)]
    return fresh


def kill_series_case(ctx: Context, workers: int) -> Row:
    """SIGKILL three times, at moments drawn from ``ctx.rng`` (one backward pass, one validation
    case and one ``last.pt`` write, in a random order), then ``--resume`` until done."""
    changes = {"data.num_workers": workers}
    reference = ctx.reference(changes)
    name = f"sigkill_workers{workers}"
    run, config = ctx.root / name, ctx.config(name, changes)
    moments = ["backward", "validation", "write:last.pt"]
    ctx.rng.shuffle(moments)
    fresh = ["train", "--config", str(config), "--out", str(run)]
    notes, handled = [], True
    for moment in moments:
        count = ctx.rng.randint(1, max(remaining_moments(run, n_val=2)[moment], 1))
        fault = f"kill@{moment}#{count}"
        outcome = run_child([f"--fault={fault}", "--", *resume_command(run, fresh)])
        free = lock_is_free(run)
        notes.append(f"{fault}: exit {outcome.returncode}, lock {'free' if free else 'HELD'}")
        handled &= outcome.returncode == -signal.SIGKILL and free
    resumes = 0
    while resumes < 3:  # --resume until done (once should do)
        resumes += 1
        outcome = run_here(resume_command(run, fresh))
        if outcome.returncode == 0:
            break
    lost, lost_flag = verdict(run, reference)
    happened = f"{'; '.join(notes)}; --resume x{resumes}: exit {outcome.returncode}, {lost}"
    return Row(f"SIGKILL x3 at random moments (seed draws), workers {workers}",
               "train; train --resume (until done)", happened,
               handled and outcome.returncode == 0 and not lost_flag, lost_flag)  # fmt: skip


def crossval_case(ctx: Context) -> Row:
    """``crossval`` stopped by SIGTERM inside fold 1; rerunning it finishes with the
    uninterrupted cross-validation's results (fold 1 resumed, fold 0 kept)."""
    changes = {"train.n_folds": 2}
    reference = ctx.reference(changes, command="crossval")
    out, config = ctx.root / "crossval", ctx.config("crossval", changes)
    command = ["crossval", "--config", str(config), "--out", str(out)]
    steps = TRAIN_SETTINGS["train"]["epochs"] * TRAIN_SETTINGS["train"]["iterations_per_epoch"]
    first = run_child([f"--fault=SIGTERM@backward#{steps + 3}", "--", *command])
    told = first.last_line.startswith("stopped by SIGTERM") and (
        f"resume with: segmenter {' '.join(command)}" in first.last_line
    )
    rerun = run_here(command)
    lost = []
    for fold in ("fold_0", "fold_1"):
        lost += [f"{fold}/{d}" for d in differences(out / fold, reference / fold)]
    lost += [n for n in ("summary.json", "postprocessing.json") if not same_json(n, out, reference)]
    lost += [f"left {p}" for p in leftovers(out)]
    happened = (f"exit {first.returncode}: {first.last_line!r}; rerun: exit {rerun.returncode}, "
                f"{'lost: ' + ', '.join(lost) if lost else 'nothing lost'}")  # fmt: skip
    handled = first.returncode == 143 and told and rerun.returncode == 0 and not lost
    return Row("SIGTERM in fold 1 of 2", "crossval; crossval (rerun)", happened, handled,
               int(bool(lost)))  # fmt: skip


def same_mask(path: Path, reference: Path) -> bool:
    """Whether the mask file ``path`` exists and holds the voxels of ``reference``."""
    from segmenter.io import read_image

    return path.is_file() and bool((read_image(path).array == read_image(reference).array).all())


def predict_resume_case(ctx: Context) -> Row:
    """``predict`` of the phantoms' folder killed (SIGKILL) while its third mask is written, half
    of it on disk; ``predict --resume`` keeps the two masks written, predicts the others, and
    ends with an uninterrupted predict's masks and no temporary file."""
    run = ctx.reference({"data.num_workers": 0})
    whole, out = ctx.root / "predict_whole", ctx.root / "predict_killed"
    command = ["predict", "--model", str(run), "--input", str(ctx.dataset / "imagesTr"),
               "--no-tta", "--output"]  # fmt: skip
    if run_here([*command, str(whole)]).returncode != 0:
        raise RuntimeError("the uninterrupted predict failed")
    names = sorted(p.name for p in whole.glob("*.nii.gz") if not p.name.startswith("."))
    first = run_child([f"--fault=kill@write:{names[2]}#1", "--", *command, str(out)])
    written = {n: (out / n).stat().st_mtime_ns for n in names if (out / n).is_file()}
    left = leftovers(out)
    rerun = run_here([*command, str(out), "--resume"])
    lost = [f"{n} differs" for n in names if not same_mask(out / n, whole / n)]
    lost += [
        f"{n} predicted again" for n, t in written.items() if (out / n).stat().st_mtime_ns != t
    ]
    lost += [f"left {p}" for p in leftovers(out)]
    happened = (f"exit {first.returncode} with {len(written)} of {len(names)} masks and "
                f"{len(left)} temporary file(s); --resume: exit {rerun.returncode}, "
                f"{'lost: ' + ', '.join(lost) if lost else 'nothing lost'}")  # fmt: skip
    handled = (first.returncode == -signal.SIGKILL and sorted(written) == names[:2]
               and rerun.returncode == 0 and not lost)  # fmt: skip
    return Row("SIGKILL writing the 3rd mask of 6", "predict DIR; predict DIR --resume", happened,
               handled, int(bool(lost)))  # fmt: skip


#: The matrix: (name, case). Other fault families append theirs.
CASES: list[tuple[str, Callable[[Context], Row]]] = [
    ("sigterm-after-step", lambda c: stop_signal_case(c, "sigterm_step", ["SIGTERM@backward#3"])),
    ("sigint-workers", lambda c: stop_signal_case(c, "sigint_workers", ["SIGINT@backward#3"],
                                                  workers=2)),
    ("sigterm-validation", lambda c: stop_signal_case(c, "sigterm_val",
                                                      ["SIGTERM@validation#1"])),
    ("sigterm-group-workers", lambda c: stop_signal_case(
        c, "sigterm_group", ["wait@backward#3"], workers=2, group_signal=signal.SIGTERM)),
    ("second-signal-while-saving", lambda c: stop_signal_case(
        c, "second_signal", ["SIGINT@backward#1", "SIGTERM@write:last.pt#1"])),
    ("sigkill-x3", lambda c: kill_series_case(c, workers=0)),
    ("sigkill-x3-workers", lambda c: kill_series_case(c, workers=2)),
    ("crossval-sigterm", crossval_case),
    ("predict-sigkill-resume", predict_resume_case),
]  # fmt: skip


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table, with a total line."""
    lines = ["| fault | command | what happened | handled | data lost |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.fault} | {r.command} | {r.happened} | "
                     f"{'yes' if r.handled else 'NO'} | {r.data_lost} |")  # fmt: skip
    handled, lost = sum(r.handled for r in rows), sum(r.data_lost for r in rows)
    lines.append(f"\n{len(rows)} faults tried, {handled} handled, data lost in {lost}")
    return "\n".join(lines)


def run_matrix(ctx: Context, names: Sequence[str] | None = None) -> list[Row]:
    """Run the cases (all, or those named), printing each row as it comes."""
    rows = []
    for name, case in CASES:
        if names and name not in names:
            continue
        t0 = time.perf_counter()
        try:
            row = case(ctx)
        except Exception as exc:  # a case that breaks is a row that failed, not a crash
            row = Row(name, "", f"the case failed: {exc!r}"[:300], False, 1)
        rows.append(dataclasses.replace(row, happened=row.happened.replace(f"{ctx.root}/", "")))
        print(f"{name}: {'handled' if row.handled else 'NOT HANDLED'} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def bad_input_table(workdir: Path) -> tuple[list[Row], str]:
    """The bad-input matrix of ``tests/bad_input_cases.py`` (every case of ``verify``, ``plan``,
    ``train``, ``predict`` and ``evaluate`` on broken files, headers, configs, checkpoints):
    its rows and a table of them by command, with every row not handled in full."""
    sys.path.insert(0, str(REPO / "tests"))
    from bad_input_cases import bad_input_rows

    found = bad_input_rows(workdir=workdir)
    rows = [Row(r.fault, r.command, r.happened, r.handled, r.data_lost) for r in found]
    lines = ["| command | bad inputs tried | handled | data lost |", "|---|---|---|---|"]
    for command in dict.fromkeys(r.command.split()[0] for r in rows):
        mine = [r for r in rows if r.command.split()[0] == command]
        lines.append(f"| {command} | {len(mine)} | {sum(r.handled for r in mine)} | "
                     f"{sum(r.data_lost for r in mine)} |")  # fmt: skip
    handled, lost = sum(r.handled for r in rows), sum(r.data_lost for r in rows)
    lines.append(f"\n{len(rows)} bad inputs tried, {handled} handled, data lost in {lost}")
    lines += [f"NOT HANDLED: {r.fault} | {r.command} | {r.happened}" for r in rows if not r.handled]
    return rows, "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix (or, with ``child``, one faulted child); exit 0 when all is handled."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if str(REPO) not in sys.path[:1]:  # this checkout's segmenter, as in the children
        sys.path.insert(0, str(REPO))
    if argv[:1] == ["child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="draws of the random moments")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument(
        "--only", nargs="+", help="case names to run", choices=[n for n, _ in CASES]
    )
    parser.add_argument(
        "--bad-inputs", action="store_true",
        help="also run the bad-input matrix (tests/bad_input_cases.py, a few minutes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from segmenter.data.synthetic import PhantomSpec, write_dataset

    root = args.workdir or Path(tempfile.mkdtemp(prefix="fault_matrix_"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        dataset = write_dataset(root / "data", 6, seed=0, spec=PhantomSpec(size=32))
        ctx = Context(root=root, dataset=dataset, rng=random.Random(args.seed))
        rows = run_matrix(ctx, args.only)
        bad, bad_table = bad_input_table(root / "bad_inputs") if args.bad_inputs else ([], "")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(rows))
    if args.bad_inputs:
        print(f"\n{bad_table}")
    rows += bad
    print(f"seed {args.seed}, {time.perf_counter() - start:.0f} s")
    return 0 if all(r.handled for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
