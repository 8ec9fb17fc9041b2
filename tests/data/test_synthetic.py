"""Tests for segmenter.data.synthetic: layout, determinism, lesion statistics, contrast,
geometry."""

from __future__ import annotations

import json
from pathlib import Path

import cc3d
import numpy as np
import pytest
from scipy import ndimage as ndi

from segmenter.data.synthetic import (
    CONTRASTS,
    TISSUE_CLASSES,
    PhantomSpec,
    case_is_lesion_free,
    make_case,
    make_phantom,
    write_dataset,
)
from segmenter.errors import InputError
from segmenter.io import affines_close, read_image

SMALL = PhantomSpec(size=32)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()
    }


def _lesion_cases(n: int, spec: PhantomSpec = SMALL) -> list:
    return [make_phantom(seed, spec, lesion_free=False) for seed in range(n)]


def test_layout_and_dataset_json(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, 3, seed=5, spec=SMALL, n_test=2)
    assert root == tmp_path / "Dataset900_Phantom"
    names = set(_files(root))
    expected = {"dataset.json"}
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        expected |= {f"imagesTr/{case}_0000.nii.gz", f"imagesTr/{case}_0001.nii.gz"}
        expected.add(f"labelsTr/{case}.nii.gz")
    for case in ("phantom_test_000", "phantom_test_001"):
        expected |= {f"imagesTs/{case}_0000.nii.gz", f"imagesTs/{case}_0001.nii.gz"}
        expected.add(f"labelsTs/{case}.nii.gz")
    assert names == expected

    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 3
    assert meta["file_ending"] == ".nii.gz"
    assert meta["synthetic"]["seed"] == 5

    # files hold exactly what make_case generates, in one geometry per case
    phantom = make_case(5, 1, SMALL)
    label = read_image(root / "labelsTr" / "phantom_001.nii.gz")
    assert label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array, phantom.label)
    for c in range(2):
        img = read_image(root / "imagesTr" / f"phantom_001_{c:04d}.nii.gz")
        assert img.array.dtype == np.float32 and img.array.shape == (32, 32, 32)
        np.testing.assert_array_equal(img.array, phantom.images[c])
        assert affines_close(img.affine, label.affine)
    test_label = read_image(root / "labelsTs" / "phantom_test_000.nii.gz")
    np.testing.assert_array_equal(test_label.array, make_case(5, 0, SMALL, test=True).label)


def test_more_channels_named_in_order(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, 1, seed=0, spec=PhantomSpec(size=32, channels=4))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1", "2": "T2", "3": "T1ce"}
    assert (root / "imagesTr" / "phantom_000_0003.nii.gz").is_file()


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = _files(write_dataset(tmp_path / "a", 3, seed=11, spec=SMALL, n_test=1))
    b = _files(write_dataset(tmp_path / "b", 3, seed=11, spec=SMALL, n_test=1))
    assert a == b
    # case k does not depend on the number of cases
    fewer = _files(write_dataset(tmp_path / "c", 2, seed=11, spec=SMALL))
    for name, data in fewer.items():
        if name != "dataset.json":
            assert a[name] == data, name
    other = _files(write_dataset(tmp_path / "d", 3, seed=12, spec=SMALL, n_test=1))
    assert other.keys() == a.keys()
    images = [n for n in a if n.startswith("images")]
    assert all(a[n] != other[n] for n in images)


def test_make_phantom_deterministic_and_stream_separation() -> None:
    spec4 = PhantomSpec(size=32, channels=4)
    p1 = make_phantom(3, spec4, lesion_free=False)
    p2 = make_phantom(np.random.SeedSequence(3), spec4, lesion_free=False)
    for x, y in zip(p1.images, p2.images, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(p1.label, p2.label)
    # a SeedSequence reused gives the same case again
    seq = np.random.SeedSequence(8)
    np.testing.assert_array_equal(
        make_phantom(seq, SMALL).images[0], make_phantom(seq, SMALL).images[0]
    )
    # fewer channels: the same first channels; oblique: same voxels, another affine
    p3 = make_phantom(3, PhantomSpec(size=32, channels=2, oblique=True), lesion_free=False)
    np.testing.assert_array_equal(p3.images[0], p1.images[0])
    np.testing.assert_array_equal(p3.images[1], p1.images[1])
    np.testing.assert_array_equal(p3.label, p1.label)
    assert not np.allclose(p3.affine, p1.affine)
    # lesion-free version of a case has the same anatomy
    p4 = make_phantom(3, spec4, lesion_free=True)
    np.testing.assert_array_equal(p4.tissues, p1.tissues)
    assert p4.lesion_free and not p1.lesion_free
    assert not np.array_equal(make_phantom(4, SMALL).images[0], p1.images[0])
    # forcing the draw's own outcome changes nothing
    drawn = make_phantom(5, SMALL)
    forced = make_phantom(5, SMALL, lesion_free=drawn.lesion_free)
    np.testing.assert_array_equal(drawn.images[0], forced.images[0])


def test_lesion_fraction_and_size_distribution() -> None:
    sizes = []
    radii = []
    for p in _lesion_cases(24):
        assert 0.0005 <= p.lesion_fraction <= 0.01
        components = cc3d.connected_components(p.label, connectivity=26)
        sizes.extend(np.bincount(components.ravel())[1:].tolist())
        radii.extend(p.lesion_radii)
    sizes = np.asarray(sizes)
    radii = np.asarray(radii)
    assert sizes.size >= 40  # several lesions per case on average
    small = np.count_nonzero(sizes <= 20)
    large = np.count_nonzero(sizes >= 100)
    assert large >= 1
    assert small > 3 * large
    assert np.median(sizes) <= 30
    # log-normal radii: within 1 voxel .. max radius, right-skewed
    assert radii.min() >= 1.0 and radii.max() <= 10.0 * 32 / 64
    assert np.median(radii) < radii.mean()


def test_lesion_free_fraction() -> None:
    # dataset pattern: any first n cases hold floor or ceil of 15 %
    flags = np.array([case_is_lesion_free(3, k, 0.15) for k in range(1000)])
    for n in (7, 20, 100, 1000):
        assert int(flags[:n].sum()) in (int(np.floor(0.15 * n)), int(np.ceil(0.15 * n)))
    assert not np.array_equal(flags, [case_is_lesion_free(4, k, 0.15) for k in range(1000)])
    # standalone draws: about 15 % over many cases (tolerant), labels empty exactly then
    free = []
    for seed in range(60):
        p = make_phantom(seed, SMALL)
        free.append(p.lesion_free)
        assert p.lesion_free == (len(p.lesion_radii) == 0)
    assert 2 <= sum(free) <= 18
    # dataset cases follow the pattern
    for k in range(10):
        assert make_case(3, k, SMALL).lesion_free == bool(flags[k])


def test_lesion_contrast_flair_bright_t1_dark() -> None:
    wm_class = TISSUE_CLASSES["wm"]
    for p in _lesion_cases(8):
        lesion = p.label.astype(bool)
        ring = ndi.binary_dilation(lesion, iterations=2) & ~lesion & (p.tissues == wm_class)
        assert ring.sum() > 0
        flair, t1 = p.images
        assert flair[lesion].mean() > flair[ring].mean()
        assert t1[lesion].mean() < t1[ring].mean()


def test_tissue_contrasts_plausible() -> None:
    # 64^3 so the cortex is more than a partial-volume ribbon; medians resist bias and noise
    p = make_phantom(2, PhantomSpec(size=64, channels=len(CONTRASTS)), lesion_free=True)
    t = p.tissues
    med = {
        name: [float(np.median(img[t == TISSUE_CLASSES[name]])) for img in p.images]
        for name in ("ventricle", "gm", "wm")
    }
    flair, t1, t2 = 0, 1, 2
    assert med["gm"][flair] > med["wm"][flair] > med["ventricle"][flair]
    assert med["wm"][t1] > med["gm"][t1] > med["ventricle"][t1]
    assert med["ventricle"][t2] > med["gm"][t2] > med["wm"][t2]


def test_anisotropic_oblique_written_and_read_back(tmp_path: Path) -> None:
    spec = PhantomSpec(size=32, spacing=(0.8, 0.8, 2.0), oblique=True)
    assert spec.shape == (32, 32, 13)
    root = write_dataset(tmp_path, 1, seed=1, spec=spec)
    phantom = make_case(1, 0, spec)
    for path in (
        root / "imagesTr" / "phantom_000_0000.nii.gz",
        root / "labelsTr" / "phantom_000.nii.gz",
    ):
        img = read_image(path)
        assert img.array.shape == (32, 32, 13)
        np.testing.assert_allclose(img.spacing, (0.8, 0.8, 2.0), rtol=1e-5)
        assert affines_close(img.affine, phantom.affine)
        rotation = img.affine[:3, :3] / np.asarray(img.spacing)
        assert np.abs(rotation - np.diag(np.diag(rotation))).max() > 0.05  # oblique
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-5)
    # default: axis-aligned but not the identity
    plain = make_phantom(1, PhantomSpec(size=32, spacing=(1.0, 1.0, 2.0))).affine
    np.testing.assert_allclose(plain[:3, :3], np.diag([1.0, 1.0, 2.0]))
    assert not np.allclose(plain, np.eye(4))


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_images_finite_float32_labels_binary(channels: int) -> None:
    for seed in range(3):
        p = make_phantom(seed, PhantomSpec(size=32, channels=channels), lesion_free=seed == 0)
        assert len(p.images) == channels
        assert p.channel_names == CONTRASTS[:channels]
        for img in p.images:
            assert img.dtype == np.float32 and img.shape == (32, 32, 32)
            assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() > 0.0
        assert p.label.dtype == np.uint8 and p.label.shape == (32, 32, 32)
        assert set(np.unique(p.label).tolist()) <= {0, 1}
        assert p.affine.shape == (4, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 8}, "size must be >= 16"),
        ({"channels": 0}, "channels must be between 1 and 6"),
        ({"channels": 7}, "channels must be between 1 and 6"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing must be three positive"),
        ({"spacing": (1.0, 1.0)}, "spacing must be three positive"),
        ({"size": 16, "spacing": (1.0, 1.0, 4.0)}, "every axis needs >= 8 voxels"),
        ({"lesion_free_fraction": 1.5}, "lesion_free_fraction must be in"),
        ({"lesion_fraction": (0.01, 0.001)}, "lesion_fraction must be"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PhantomSpec(**kwargs)


def test_write_dataset_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_cases must be an integer >= 1"):
        write_dataset(tmp_path, 0, seed=0, spec=SMALL)
    with pytest.raises(ValueError, match="n_test must be an integer >= 0"):
        write_dataset(tmp_path, 1, seed=0, spec=SMALL, n_test=-1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        write_dataset(tmp_path, 1, seed=-3, spec=SMALL)
    with pytest.raises(ValueError, match="name must look like"):
        write_dataset(tmp_path, 1, seed=0, spec=SMALL, name="Phantom")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        make_phantom(-1, SMALL)
    assert not any(tmp_path.iterdir())


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, 3, seed=0, spec=SMALL)
    with pytest.raises(InputError, match="already exists"):
        write_dataset(tmp_path, 1, seed=0, spec=SMALL)
    write_dataset(tmp_path, 1, seed=0, spec=SMALL, overwrite=True)
    assert sorted(f.name for f in (root / "labelsTr").iterdir()) == ["phantom_000.nii.gz"]
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path, 1, seed=0, spec=SMALL, progress=True)
    assert "synth" in capsys.readouterr().err
