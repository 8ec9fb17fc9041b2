"""Tests for segmenter.interrupts: stop signals only set a flag while the block runs, and the
previous handlers come back after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from segmenter.interrupts import StopRequest, stop_requests

ROOT = Path(__file__).resolve().parents[1]


def test_a_stop_signal_only_sets_the_flag_and_the_first_one_is_kept() -> None:
    with stop_requests() as stop:
        assert not stop.requested and stop.name == ""
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without it
        assert (stop.signum, stop.name, stop.count) == (signal.SIGTERM, "SIGTERM", 2)


def test_the_previous_handlers_come_back_after_the_block_even_after_an_error() -> None:
    seen: list[int] = []
    sigint = signal.getsignal(signal.SIGINT)  # Python's default; ignored when started in background
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        try:
            with stop_requests():
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert signal.getsignal(signal.SIGINT) is sigint
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    found: list[StopRequest] = []

    def body() -> None:
        with stop_requests() as stop:
            found.append(stop)
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert len(found) == 1 and not found[0].requested


def test_importing_the_package_installs_no_handler() -> None:
    code = ("import signal; before = [signal.getsignal(s) for s in (2, 15)]; "
            "import segmenter.cli, segmenter.training.loop, segmenter.workflows.crossval; "
            "print([signal.getsignal(s) for s in (2, 15)] == before)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert run.stdout.strip() == "True"
