"""One segmenter process per output folder: an advisory lock a killed process cannot leave stuck.

``train``, ``crossval``, ``compare`` and a folder ``predict`` hold :class:`FolderLock` on their
output folder while they run: a second process on the same folder is refused at once with one
line naming the holder (exit code 2) instead of both writing the same files. The lock is
``flock`` on ``FOLDER/.segmenter.lock``: the kernel releases it when the holder's process ends
in any way (SIGKILL included), so a stale lock file never blocks a rerun; the file itself stays
(a hidden one-line note of the last holder).

A forked child (a DataLoader worker) would share the lock, and a holder killed with SIGKILL would
then keep its folder locked until its orphaned workers noticed and exited (seconds), refusing
an immediate ``--resume`` in the name of a dead process. So the lock is closed in every child
forked while it is held (``os.register_at_fork``): only the process that took it holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from segmenter.errors import InputError

LOCK_FILE = ".segmenter.lock"


class FolderLock:
    """Exclusive, non-blocking lock on a folder (created if missing), as a context manager.

    Args:
        folder: the output folder.
        command: what holds it, for the refusal message (e.g. ``"train"``).

    Raises:
        InputError: on entry, another process holds the folder.
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self.folder = Path(folder)
        self.command = command
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / LOCK_FILE

    def __enter__(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InputError(
                f"{self.folder}: in use by {holder}; wait for it to finish or choose another "
                f"output folder"
            ) from None
        os.ftruncate(fd, 0)
        note = f"segmenter {self.command} (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})"
        os.pwrite(fd, note.encode() + b"\n", 0)
        self._fd = fd
        os.register_at_fork(after_in_child=_close_in_child(weakref.ref(self)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def remove_unused(folder: str | Path) -> None:
    """Remove ``folder`` when it holds nothing but its lock file: what a command refused before
    writing anything leaves behind when it created the folder itself."""
    path = Path(folder)
    if not path.is_dir() or any(p.name != LOCK_FILE for p in path.iterdir()):
        return
    (path / LOCK_FILE).unlink(missing_ok=True)
    path.rmdir()


def _close_in_child(ref: weakref.ReferenceType[FolderLock]) -> Callable[[], None]:
    """An after-fork hook: the child's copy of the lock lets go of the file (closing the child's
    descriptor releases nothing while the parent's stays open)."""

    def close() -> None:
        lock = ref()
        if lock is not None and lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None

    return close


__all__ = ["LOCK_FILE", "FolderLock", "remove_unused"]
