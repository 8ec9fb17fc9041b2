from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segmenter.errors import InputError
from segmenter.io import (
    HeaderError,
    affines_close,
    read_image,
    read_info,
    strip_suffix,
    write_image,
    write_like,
)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from Euler angles in degrees (x, then y, then z)."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_lps_affine() -> np.ndarray:
    """Oblique, anisotropic affine whose first two axes point left-to-right and A-to-P (LPS)."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation(12, -7, 25) @ np.diag([0.7, 1.1, 3.5])
    affine[:3, 3] = [90.5, 120.25, -60.0]
    return affine


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(11, 13, 7)).astype(np.float32)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path: Path, volume: np.ndarray, ext: str) -> None:
    affine = oblique_lps_affine()
    path = write_image(tmp_path / f"img{ext}", volume, affine)
    img = read_image(path)
    np.testing.assert_array_equal(img.array, volume)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(img.spacing, (0.7, 1.1, 3.5), rtol=1e-6)
    info = read_info(path)
    assert info.shape == volume.shape
    np.testing.assert_allclose(info.affine, affine, atol=1e-5)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_nibabel_and_simpleitk_reads_agree_on_oblique_lps_file(
    tmp_path: Path, volume: np.ndarray, ext: str
) -> None:
    affine = oblique_lps_affine()
    path = write_image(tmp_path / f"img{ext}", volume, affine)
    a = read_image(path, backend="nibabel")
    b = read_image(path, backend="sitk")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
    # An independent check with SimpleITK's own API: voxel (1, 2, 3) maps to the same point.
    simg = sitk.ReadImage(str(path))
    lps = np.array(simg.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0)))
    ras = (a.affine @ np.array([1.0, 2.0, 3.0, 1.0]))[:3]
    np.testing.assert_allclose(ras, lps * np.array([-1, -1, 1]), atol=1e-4)
    # and SimpleITK's array (z, y, x) is our array transposed
    np.testing.assert_array_equal(sitk.GetArrayFromImage(simg), volume.transpose(2, 1, 0))


def test_nrrd_written_by_simpleitk_reads_into_the_nifti_convention(
    tmp_path: Path, volume: np.ndarray
) -> None:
    """A file written by another tool (plain SimpleITK) lands in our convention."""
    simg = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    simg.SetSpacing((0.5, 0.75, 2.0))
    simg.SetOrigin((10.0, -5.0, 3.0))  # LPS
    path = tmp_path / "ext.nrrd"
    sitk.WriteImage(simg, str(path))
    img = read_image(path)
    np.testing.assert_array_equal(img.array, volume)
    expected = np.diag([-0.5, -0.75, 2.0, 1.0])
    expected[:3, 3] = [-10.0, 5.0, 3.0]
    np.testing.assert_allclose(img.affine, expected, atol=1e-9)


def test_write_like_copies_source_geometry_codes_and_pixdim(
    tmp_path: Path, volume: np.ndarray
) -> None:
    affine = oblique_lps_affine()
    src = nib.Nifti1Image(volume, affine)
    src.set_sform(affine, code=4)  # mni
    src.set_qform(affine, code=1)  # scanner
    src.header.set_xyzt_units("mm", "sec")
    src_path = tmp_path / "scan.nii.gz"
    nib.save(src, str(src_path))
    scan = read_image(src_path)
    mask = (scan.array > 1.0).astype(np.uint8)
    out = write_like(tmp_path / "mask.nii.gz", mask, scan)
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    assert int(written.header["sform_code"]) == 4
    assert int(written.header["qform_code"]) == 1
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_allclose(written.header.get_zooms()[:3], (0.7, 1.1, 3.5), rtol=1e-6)
    assert written.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)
    # probabilities as float32 keep their dtype, with no scaling
    prob = np.clip(scan.array, 0, 1).astype(np.float32)
    back = read_image(write_like(tmp_path / "prob.nii.gz", prob, scan))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, prob)


def test_write_like_rejects_a_shape_mismatch(tmp_path: Path, volume: np.ndarray) -> None:
    scan = read_image(write_image(tmp_path / "s.nii.gz", volume, np.eye(4)))
    with pytest.raises(ValueError, match="does not match reference"):
        write_like(tmp_path / "m.nii.gz", np.zeros((3, 3, 3), np.uint8), scan)
    assert not (tmp_path / "m.nii.gz").exists()


def test_missing_file_is_one_line_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.nii\.gz: file not found"):
        read_image(tmp_path / "nope.nii.gz")


def test_truncated_nifti_is_input_error(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_image(tmp_path / "t.nii.gz", volume, np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"t\.nii\.gz: header claims .* but the file holds") as err:
        read_image(path)
    assert "\n" not in str(err.value)


def test_non_nifti_bytes_are_input_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image" * 10))
    with pytest.raises(InputError, match="fake.nii.gz: cannot read"):
        read_info(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unsupported image format '.png'"):
        read_image(path)


def test_4d_volume_rejected_where_3d_expected(tmp_path: Path) -> None:
    path = write_image(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(InputError, match=r"4d.nii.gz: expected a 3D volume, got 4D"):
        read_image(path)
    assert read_image(path, ndim=None).array.shape == (4, 4, 4, 2)
    # a trailing singleton axis is not a real 4th dimension
    path1 = write_image(tmp_path / "s.nii.gz", np.zeros((4, 4, 4, 1), np.float32), np.eye(4))
    assert read_image(path1).array.shape == (4, 4, 4)


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - nibabel rejects object arrays its own way
        write_image(tmp_path / "bad.nii.gz", np.zeros((2, 2, 2), dtype=object), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_bool_mask_written_as_uint8(tmp_path: Path) -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = True
    img = read_image(write_image(tmp_path / "m.nii.gz", mask, np.eye(4)))
    assert img.array.dtype == np.uint8
    assert int(img.array.sum()) == 1


def test_helpers() -> None:
    assert strip_suffix("case_0000.nii.gz") == "case_0000"
    assert strip_suffix("/a/b/x.mha") == "x"
    a = oblique_lps_affine()
    b = a.copy()
    b[0, 3] += 1e-4
    assert affines_close(a, b)
    b[0, 3] += 0.1
    assert not affines_close(a, b)


def _raw_header_edit(path: Path, **fields: float) -> None:
    """Set raw NIfTI-1 header fields of an uncompressed ``.nii`` (no nibabel checks)."""
    data = bytearray(path.read_bytes())
    header = np.ndarray((), dtype=nib.nifti1.header_dtype, buffer=data)
    for name, value in fields.items():
        header[name] = value
    path.write_bytes(bytes(data))


def test_a_vox_offset_inside_the_header_is_refused_not_read_as_voxels(
    tmp_path: Path, volume: np.ndarray
) -> None:
    # found by tests/header_fuzz.py: nibabel reads such a file from byte 0, header included
    path = write_image(tmp_path / "v.nii", volume.astype(np.float32), np.eye(4))
    _raw_header_edit(path, vox_offset=0.0)
    with pytest.raises(HeaderError, match=r"v\.nii: vox_offset 0 lies inside the header"):
        read_image(path)


def test_a_scaling_past_float32_is_refused_not_read_as_inf(
    tmp_path: Path, volume: np.ndarray
) -> None:
    # found by tests/header_fuzz.py: scl_slope 3.4e38 made every voxel inf after the cast
    path = write_image(tmp_path / "s.nii", volume.astype(np.float32) + 2.0, np.eye(4))
    _raw_header_edit(path, scl_slope=3.4e38)
    assert np.isfinite(read_image(path).array).all()  # float64, as nibabel scales
    with pytest.raises(HeaderError, match=r"s\.nii: voxel values up to .* exceed the float32"):
        read_image(path, dtype=np.float32)
