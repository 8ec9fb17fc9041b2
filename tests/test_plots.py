"""Tests for segmenter.plots helpers not covered through the comparison runner."""

from __future__ import annotations

from pathlib import Path

from segmenter import plots


def test_lesion_size_histogram_counts_every_lesion(tmp_path: Path) -> None:
    volumes = [1.0, 2.0, 3.5, 12.0, 80.0, 450.0, 9000.0, 0.0]  # the 0 is not drawable on log
    fig = plots.lesion_sizes(volumes, (0.0, 10.0, 100.0, float("inf")), path=tmp_path / "h.png")
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 7
    assert [line.get_xdata()[0] for line in ax.lines] == [10.0, 100.0]
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    empty = plots.lesion_sizes([], title="no lesions")
    assert empty.axes[0].get_title() == "no lesions"
