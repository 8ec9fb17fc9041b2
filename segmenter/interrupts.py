"""Graceful stops on SIGINT and SIGTERM: a flag that a long loop checks at its safe points.

While :func:`stop_requests` is active (``segmenter.training.loop.fit`` holds it while it trains),
SIGINT (Ctrl-C) and SIGTERM (``kill``, a batch system's time limit) only record that a stop was
asked for: the handler sets :attr:`StopRequest.signum` and returns. The loop checks the flag at
its safe points, saves its progress and raises :class:`~segmenter.errors.Interrupted`, which the
CLI turns into one line and exit code ``128 + signum``.

A further signal while the progress is being saved is only counted: the first one is reported
and the save (an atomic write) finishes undisturbed. SIGKILL cannot be caught, and stays the way
to stop at once; the atomic writes and ``--resume`` make that safe too. On exit the previous
handlers come back. Outside the main thread, where Python cannot install handlers, nothing is
installed and the signals keep their usual effect.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

#: The signals that ask for a graceful stop.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Whether a stop was asked for, set from a signal handler.

    Attributes:
        signum: the first stop signal received, or None.
        count: how many stop signals arrived (a second one changes nothing else).
    """

    signum: int | None = None
    count: int = 0

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    @property
    def name(self) -> str:
        """The first signal's name, e.g. ``SIGTERM`` (empty before any)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: record the signal, nothing else (no I/O, no exception)."""
        if self.signum is None:
            self.signum = signum
        self.count += 1


@contextlib.contextmanager
def stop_requests(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Turn ``signals`` into a :class:`StopRequest` flag for the duration of the block.

    Args:
        signals: the signal numbers to catch (default SIGINT and SIGTERM).

    Yields:
        The request the handlers set; it stays False when none arrives, and outside the main
        thread, where no handler is installed.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():  # None: installed outside Python; the default then
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


__all__ = ["STOP_SIGNALS", "StopRequest", "stop_requests"]
