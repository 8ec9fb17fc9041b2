"""Tests for segmenter.planning.fingerprint: per-case figures against direct computation, JSON
output."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmenter.data.layout import load_dataset
from segmenter.data.synthetic import PhantomSpec, write_dataset
from segmenter.planning.fingerprint import (
    PERCENTILES,
    case_fingerprint,
    dataset_fingerprint,
    lesion_volumes_mm3,
    write_fingerprint,
)


def test_lesion_volumes_count_components_in_mm3() -> None:
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:4, 2:4, 2:4] = 1  # 8 voxels
    label[10:15, 10:12, 10:11] = 2  # 10 voxels, another class: still a lesion
    label[5, 5, 5] = 1
    label[6, 6, 6] = 1  # touches (5, 5, 5) at a corner: one component of 2 voxels
    assert lesion_volumes_mm3(label, (1.0, 2.0, 0.5)) == [10.0, 8.0, 2.0]
    assert lesion_volumes_mm3(label, (1.0, 1.0, 1.0), connectivity=6) == [10.0, 8.0, 1.0, 1.0]
    assert lesion_volumes_mm3(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0)) == []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = PhantomSpec(size=24, spacing=(1.0, 1.0, 2.0), oblique=True)
    return write_dataset(tmp_path_factory.mktemp("fp"), 3, seed=4, spec=spec)


def test_case_fingerprint_matches_the_files(dataset: Path) -> None:
    case = load_dataset(dataset).training[0]
    fp = case_fingerprint(case)
    img = nib.load(case.images[0])
    data = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in case.images])
    label = np.asarray(nib.load(case.label).dataobj)
    assert fp["case_id"] == case.case_id
    assert fp["shape"] == list(img.shape)
    np.testing.assert_allclose(fp["spacing"], img.header.get_zooms()[:3])
    assert fp["orientation"] == "".join(nib.aff2axcodes(img.affine))
    inside = (data != 0).any(axis=0)  # phantoms: no holes in the head
    assert fp["nonzero_fraction"] == pytest.approx(inside.mean())
    for stats, channel in zip(fp["channels"], data, strict=True):
        values = channel[inside].astype(np.float64)
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["percentiles"]["99.5"] == pytest.approx(np.percentile(values, 99.5))
        assert list(stats["percentiles"]) == [str(p) for p in PERCENTILES]
    voxel = float(np.prod(fp["spacing"]))
    assert fp["lesion_total_mm3"] == pytest.approx((label > 0).sum() * voxel)
    assert fp["lesion_count"] == len(fp["lesion_volumes_mm3"])


def test_dataset_fingerprint_summary_and_json(dataset: Path, tmp_path: Path) -> None:
    ds = load_dataset(dataset)
    fp = dataset_fingerprint(ds, workers=2)
    assert [c["case_id"] for c in fp["cases"]] == [c.case_id for c in ds.training]
    summary = fp["summary"]
    assert summary["n_cases"] == 3
    assert summary["median_spacing"] == pytest.approx([1.0, 1.0, 2.0])
    assert [c["name"] for c in summary["channels"]] == fp["channel_names"]
    assert summary["lesions"]["total"] == sum(c["lesion_count"] for c in fp["cases"])
    path = write_fingerprint(fp, tmp_path / "fingerprint.json")
    assert json.loads(path.read_text())["summary"]["n_cases"] == 3
