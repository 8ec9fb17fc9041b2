"""Tests for segmenter.resources: the memory available (MemAvailable, lowered to a cgroup's
headroom), the process's peak resident set and byte counts in words."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from segmenter.resources import available_memory, cgroup_headroom, format_bytes, peak_rss_mb

MEMINFO = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   21000000 kB\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def no_cgroup(tmp_path: Path) -> dict[str, Path]:
    return {"cgroup_root": tmp_path / "none", "proc_cgroup": tmp_path / "no_cgroup"}


def test_available_memory_is_memavailable_in_bytes(tmp_path: Path) -> None:
    meminfo = write(tmp_path / "meminfo", MEMINFO)
    assert available_memory(meminfo, **no_cgroup(tmp_path)) == 21_000_000 * 1024


def test_without_meminfo_the_free_pages_count(tmp_path: Path) -> None:
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    got = available_memory(tmp_path / "missing", **no_cgroup(tmp_path))
    assert got is not None and abs(got - free) < 0.25 * free + 2**28


def test_a_cgroup_v2_limit_lowers_the_figure_to_its_headroom(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    job = root / "slurm" / "job_7"
    write(job / "memory.max", f"{8 * 2**30}\n")
    write(job / "memory.current", f"{3 * 2**30}\n")
    write(job / "memory.stat", f"anon 123\ninactive_file {2**30}\n")  # reclaimable: not used
    write(root / "slurm" / "memory.max", "max\n")  # no limit higher up
    write(root / "slurm" / "memory.current", "1\n")
    proc = write(tmp_path / "proc_cgroup", "0::/slurm/job_7\n")
    meminfo = write(tmp_path / "meminfo", MEMINFO)
    assert cgroup_headroom(root, proc) == 6 * 2**30
    assert available_memory(meminfo, root, proc) == 6 * 2**30


def test_a_parents_tighter_cgroup_v1_limit_binds(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    for folder, limit, usage in (("memory/batch", 4 * 2**30, 3 * 2**30),
                                 ("memory/batch/task", 2**62, 2**30)):  # fmt: skip
        write(root / folder / "memory.limit_in_bytes", f"{limit}\n")
        write(root / folder / "memory.usage_in_bytes", f"{usage}\n")
    write(root / "memory/batch/memory.stat", f"cache 5\ntotal_inactive_file {2**29}\n")
    proc = write(tmp_path / "proc_cgroup", "7:cpu:/x\n4:memory:/batch/task\n")
    assert cgroup_headroom(root, proc) == 2**30 + 2**29


def test_no_cgroup_limit_leaves_memavailable(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(root / "memory" / "memory.usage_in_bytes", "1000\n")
    proc = write(tmp_path / "proc_cgroup", "4:memory:/\n")
    meminfo = write(tmp_path / "meminfo", MEMINFO)
    assert cgroup_headroom(root, proc) is None
    assert available_memory(meminfo, root, proc) == 21_000_000 * 1024


def test_the_peak_resident_set_counts_a_200_mb_array_in_mb() -> None:
    code = (
        "import numpy as np; from segmenter.resources import peak_rss_mb; "
        "a = np.ones(25_000_000); print(peak_rss_mb())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # the array plus the interpreter and numpy, not the size of this (large) parent process
    assert 200.0 <= float(run.stdout) <= 400.0


def test_the_peak_falls_back_to_getrusage_without_proc(tmp_path: Path) -> None:
    # ru_maxrss is at least this process's own high-water mark (and in the same unit)
    assert peak_rss_mb() - 1.0 <= peak_rss_mb(tmp_path / "no_status") < 100 * peak_rss_mb()
    status = write(tmp_path / "status", "Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t 1 kB\n")
    assert peak_rss_mb(status) == pytest.approx(123456 * 1024 / 1e6)


@pytest.mark.parametrize(
    ("n", "text"),
    [(38_200_000_000, "38.2 GB"), (999_000_000, "999.0 MB"), (1_000_000_000, "1.0 GB"),
     (12_345, "0.0 MB")],
)  # fmt: skip
def test_bytes_read_in_decimal_units(n: int, text: str) -> None:
    assert format_bytes(n) == text
