"""Tests for segmenter.atomic: a write cut short leaves the target whole, and its temporary file
is recognised and removed later."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmenter.atomic import TEMPORARY_NAME, atomic_path, remove_stale_temporaries, write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    write_text(tmp_path / "metrics.csv", "old\n")
    with pytest.raises(RuntimeError, match="cut short"):
        with atomic_path(tmp_path / "metrics.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("cut short")
    assert (tmp_path / "metrics.csv").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


@pytest.mark.parametrize("name", ["last.pt", "mask.nii.gz", "metrics.csv", "README"])
def test_temporary_names_are_recognised_and_real_outputs_are_not(tmp_path: Path, name: str) -> None:
    with atomic_path(tmp_path / name) as tmp:
        assert TEMPORARY_NAME.match(tmp.name), tmp.name
    for kept in (name, ".segmenter.lock", "last.tmp.pt", ".hidden.tmp", "notes.tmp.txt"):
        assert not TEMPORARY_NAME.match(kept), kept


def test_stale_temporaries_are_removed_at_any_depth_and_nothing_else(tmp_path: Path) -> None:
    stale = [tmp_path / ".plan.json.k2v_9xq0.tmp.json",
             tmp_path / "checkpoints" / ".last.pt.abcd1234.tmp.pt",
             tmp_path / "validation" / ".case.nii.gz.0a1b2c3d.tmp.nii.gz"]  # fmt: skip
    kept = [tmp_path / "checkpoints" / "last.pt", tmp_path / ".segmenter.lock",
            tmp_path / "metrics.csv"]  # fmt: skip
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert all(p.is_file() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temporaries(tmp_path / "missing") == []
