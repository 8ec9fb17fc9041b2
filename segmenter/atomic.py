"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash or a bad input never leaves a half-written output under the final name. A process killed
mid-write (SIGKILL, power loss) can leave its temporary file, ``.NAME.XXXXXXXX.tmp[.EXT]``, beside
the target; :func:`remove_stale_temporaries` deletes those once no writer can be running (under
the folder's lock, :mod:`segmenter.locking`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: The names :func:`atomic_path` gives its temporary files: a dot, the target's name, the eight
#: random characters of :func:`tempfile.mkstemp`, ``.tmp`` and the target's extension.
TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*$")


def _suffixes(path: Path) -> str:
    name = path.name
    for double in (".nii.gz", ".tar.gz"):
        if name.endswith(double):
            return double
    return path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to ``path`` on success.

    The temporary name keeps the target's extension (``.nii.gz`` included), so writers that pick
    the format from the extension behave as for the final name. On an exception the temporary
    file is removed and the target is left untouched.

    Args:
        path: final destination. Its parent directory is created if missing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{_suffixes(target)}", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` to ``dst`` atomically (the parent folder is created); returns ``dst``."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def remove_stale_temporaries(
    folder: str | os.PathLike[str], *, recursive: bool = True
) -> list[Path]:
    """Delete the temporary files (:data:`TEMPORARY_NAME`) that killed writers left in ``folder``
    and below.

    Only call it while no writer of ours can be running there, i.e. while holding the folder's
    lock: a live writer's temporary file looks the same.

    Args:
        folder: the output folder (a missing one holds nothing).
        recursive: also in its subfolders (False: ``folder`` itself only, for a folder whose
            subfolders another process may own).

    Returns:
        The files removed, sorted.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found = root.rglob(".*.tmp*") if recursive else root.glob(".*.tmp*")
    stale = sorted(p for p in found if TEMPORARY_NAME.match(p.name) and p.is_file())
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale
