"""The machine's memory: how much a new allocation can take, and how much this process used.

- :func:`available_memory`: bytes the process can still allocate before the kernel's OOM
  killer steps in: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the page cache and
  slabs the kernel can reclaim; ``os.sysconf`` free pages where that file does not exist),
  lowered to the headroom of the process's cgroup when it has a memory limit (a SLURM job, a
  container), which the OOM killer enforces on its own;
- :func:`peak_rss_mb`: the largest resident set this process has had (``VmHWM``);
- :func:`format_bytes`: a byte count in words, as error messages print it.

Read on call, never at import; no torch here.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

#: Bytes per kB in ``/proc/meminfo`` and ``ru_maxrss`` on Linux (both are KiB).
_KIB = 1024
#: A cgroup v1 "no limit" is the largest page-aligned 63-bit number; anything above this is none.
_NO_LIMIT = 1 << 60


def _meminfo_available(meminfo: Path) -> int | None:
    """``MemAvailable`` of a ``/proc/meminfo``-format file in bytes, or None without it."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == "MemAvailable" and value.split():
            return int(value.split()[0]) * _KIB
    return None


def _sysconf_available() -> int | None:
    """Free physical pages times the page size (``os.sysconf``), or None where unsupported."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    """One value of a cgroup ``memory.stat`` file (0 when missing)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_folders(cgroup_root: Path, proc_cgroup: Path) -> list[tuple[Path, bool]]:
    """The process's memory cgroup and its ancestors up to the mount, ``(folder, is_v2)``, as
    ``/proc/self/cgroup`` names them (a parent's limit binds its children too)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    folders: list[tuple[Path, bool]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":
            base, v2 = cgroup_root, True
        elif "memory" in controllers.split(","):
            base, v2 = cgroup_root / "memory", False
        else:
            continue
        folder = base / rel.strip().lstrip("/")
        folders += [(f, v2) for f in (folder, *folder.parents) if f == base or base in f.parents]
    return folders


#: cgroup v2 and v1 file names: the limit, the usage, the reclaimable page cache in memory.stat.
_CGROUP_FILES = {
    True: ("memory.max", "memory.current", "inactive_file"),
    False: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def cgroup_headroom(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Bytes left under the tightest memory limit of the process's cgroups, None without one.

    A limit minus its usage, the usage not counting the inactive page cache the kernel reclaims
    before it kills (as ``docker stats`` counts it); the smallest such headroom of the process's
    cgroup and its ancestors. cgroup v2 (``memory.max``, ``memory.current``) and v1
    (``memory.limit_in_bytes``, ``memory.usage_in_bytes``).

    Args:
        cgroup_root: where the cgroup file systems are mounted.
        proc_cgroup: the ``/proc/self/cgroup`` listing of the process's cgroups.
    """
    headrooms = []
    for folder, v2 in _cgroup_folders(cgroup_root, proc_cgroup):
        limit_file, usage_file, inactive = _CGROUP_FILES[v2]
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        used = max(usage - _stat_value(folder / "memory.stat", inactive), 0)
        headrooms.append(max(limit - used, 0))
    return min(headrooms) if headrooms else None


def available_memory(
    meminfo: Path = Path("/proc/meminfo"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """Bytes this process can still allocate (see the module docstring), None when unknown.

    Args:
        meminfo: a ``/proc/meminfo``-format file.
        cgroup_root: where the cgroup file systems are mounted.
        proc_cgroup: the ``/proc/self/cgroup`` listing.
    """
    system = _meminfo_available(meminfo)
    if system is None:
        system = _sysconf_available()
    limited = cgroup_headroom(cgroup_root, proc_cgroup)
    known = [v for v in (system, limited) if v is not None]
    return min(known) if known else None


def _status_kib(key: str, status: Path) -> int | None:
    """A ``kB`` field of a ``/proc/<pid>/status``-format file, or None."""
    try:
        lines = status.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == key and value.split():
            return int(value.split()[0])
    return None


def peak_rss_mb(status: Path = Path("/proc/self/status")) -> float:
    """The largest resident set size this process has had so far, in MB (10^6 bytes).

    Linux: ``VmHWM`` of ``/proc/self/status``. ``getrusage``'s ``ru_maxrss`` only where that
    is missing: on Linux it survives ``fork`` and ``exec``, so a process started by a large
    one reports its parent's size.
    """
    hwm = _status_kib("VmHWM", status)
    if hwm is not None:
        return hwm * _KIB / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * _KIB / 1e6  # macOS: bytes


def format_bytes(n: int | float) -> str:
    """``n`` bytes as ``38.2 GB`` or ``512.0 MB`` (decimal units, one decimal)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


__all__ = ["available_memory", "cgroup_headroom", "format_bytes", "peak_rss_mb"]
