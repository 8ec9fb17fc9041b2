"""Error types that the CLI maps to exit codes."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: a missing or corrupt file, a geometry mismatch, an unknown config key.

    The message is one line that names the file (or key) and the problem. The CLI prints it
    without a traceback and exits with code 2.
    """


class PeerLost(RuntimeError):
    """Data-parallel training lost a rank: another process died, or a collective timed out.

    The message is one line naming this rank and the cause; the CLI prints it without a
    traceback and exits with code 1.
    """


class TrainingFailed(RuntimeError):
    """A training run in a process of its own (``crossval --devices``) exited with an error.

    The message is one line naming the training and its console log; the CLI prints it without a
    traceback and exits with code 1.
    """


class Interrupted(KeyboardInterrupt):
    """A stop request (SIGINT or SIGTERM) honoured at a safe point, after the progress was saved.

    A ``KeyboardInterrupt``, so that code handling Ctrl-C handles it too and ``except Exception``
    does not swallow it. The message is one line saying where the run stopped and where its
    progress is; the CLI prints it with the command that resumes, and exits with
    ``128 + signum`` (130 for SIGINT, 143 for SIGTERM, as shells report a process ended by them).

    Attributes:
        signum: the signal that asked for the stop.
        folder: the run folder holding the saved progress (``checkpoints/last.pt``).
    """

    def __init__(self, message: str, *, signum: int, folder: Path) -> None:
        super().__init__(message)
        self.signum = signum
        self.folder = folder
