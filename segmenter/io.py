"""Medical image I/O: the only module that touches nibabel and SimpleITK.

Convention for every format: the array is indexed ``[i, j, k]`` in the file's own voxel order
(NIfTI order; SimpleITK's ``(z, y, x)`` arrays are transposed to it), and ``affine`` is the 4x4
matrix mapping ``(i, j, k, 1)`` to RAS+ world coordinates in mm (nibabel's convention; ITK's LPS
direction/origin are converted). ``spacing`` is the voxel size in mm along ``i, j, k``.

NIfTI (.nii, .nii.gz) is read and written with nibabel; .nrrd, .nhdr, .mha and .mhd with
SimpleITK. A mask or probability map written with :func:`write_like` carries the source's
geometry (affine, sform and qform codes, pixdim, xyzt units), so it overlays the scan in a viewer.
Every write is atomic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from segmenter.atomic import atomic_path
from segmenter.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

# LPS (ITK) <-> RAS (NIfTI/nibabel) world coordinates: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ImageInfo:
    """Geometry of an image file, read without loading the voxels.

    Attributes:
        path: the file.
        shape: array shape in ``(i, j, k[, ...])`` order.
        affine: 4x4 voxel-to-RAS+ (mm) matrix.
        spacing: voxel size in mm along ``i, j, k``.
        dtype: on-disk voxel type (NIfTI), None when the reader does not say (ITK formats).
    """

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: np.dtype | None

    @property
    def ndim(self) -> int:
        """Number of array dimensions."""
        return len(self.shape)


@dataclass(frozen=True)
class Image:
    """A volume with its geometry.

    Attributes:
        array: voxels, ``(i, j, k)`` order (see the module docstring).
        affine: 4x4 voxel-to-RAS+ (mm) matrix.
        spacing: voxel size in mm along ``i, j, k``.
        header: the NIfTI header when read from NIfTI (kept so outputs copy its geometry
            fields), else None.
        path: the file it came from, if any.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    header: nib.Nifti1Header | None = None
    path: Path | None = None

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3."""
        return float(np.prod(self.spacing))


def suffix_of(path: str | os.PathLike[str]) -> str:
    """The image extension of ``path`` (``.nii.gz`` counted as one), lower case."""
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has a supported image extension."""
    return suffix_of(path) in SUPPORTED_SUFFIXES


def strip_suffix(path: str | os.PathLike[str]) -> str:
    """File name without its image extension (``case_0000.nii.gz`` -> ``case_0000``)."""
    name = Path(path).name
    suffix = suffix_of(name)
    return name[: len(name) - len(suffix)] if suffix in SUPPORTED_SUFFIXES else Path(name).stem


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm: the column norms of the affine's 3x3 part."""
    norms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def _check_readable(path: Path) -> str:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    suffix = suffix_of(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(
            f"{path}: unsupported image format '{suffix}' "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return suffix


def _sitk_affine(img: sitk.Image) -> np.ndarray:
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    return affine


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # ITK messages are multi-line with the useful part last
    useful = [t.strip() for t in text if t.strip()]
    return useful[-1] if useful else type(exc).__name__


def read_info(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image file's geometry without loading its voxels.

    Raises:
        InputError: missing, unsupported or unreadable file (one line naming the file).
    """
    p = Path(path)
    suffix = _check_readable(p)
    try:
        if suffix in NIFTI_SUFFIXES:
            img = nib.load(str(p))
            shape = tuple(int(s) for s in img.shape)
            zooms = img.header.get_zooms()
            spacing = tuple(float(z) for z in (tuple(zooms) + (1.0, 1.0, 1.0))[:3])
            return ImageInfo(p, shape, np.asarray(img.affine), spacing, img.get_data_dtype())
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        size = reader.GetSize()
        n_comp = reader.GetNumberOfComponents()
        shape = tuple(int(s) for s in size) + ((n_comp,) if n_comp > 1 else ())
        dim = reader.GetDimension()
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)
        spacing_v = np.asarray(reader.GetSpacing(), dtype=np.float64)
        origin = np.asarray(reader.GetOrigin(), dtype=np.float64)
        affine = np.eye(4)
        k = min(dim, 3)
        affine[:k, :k] = (_LPS_TO_RAS[:k, :k] @ direction[:k, :k]) @ np.diag(spacing_v[:k])
        affine[:k, 3] = _LPS_TO_RAS[:k, :k] @ origin[:k]
        spacing = tuple(float(s) for s in (tuple(spacing_v[:3]) + (1.0, 1.0, 1.0))[:3])
        return ImageInfo(p, shape, affine, spacing, None)
    except InputError:
        raise
    except Exception as exc:  # nibabel / ITK raise many types for a corrupt file
        raise InputError(f"{p}: cannot read image header ({_one_line(exc)})") from None


def _squeeze_to(array: np.ndarray, ndim: int | None, path: Path) -> np.ndarray:
    if ndim is None:
        return array
    while array.ndim > ndim and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != ndim:
        raise InputError(
            f"{path}: expected a {ndim}D volume, got {array.ndim}D shape {tuple(array.shape)}"
        )
    return array


def read_image(
    path: str | os.PathLike[str],
    *,
    ndim: int | None = 3,
    dtype: np.dtype | type | None = None,
    backend: Literal["auto", "nibabel", "sitk"] = "auto",
) -> Image:
    """Read an image into the package's axis convention.

    Args:
        path: .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd file.
        ndim: expected dimensionality; trailing singleton axes are dropped to reach it. None
            keeps whatever the file holds.
        dtype: cast the voxels to this type (None keeps the stored type, with NIfTI scaling
            applied by nibabel).
        backend: ``auto`` (nibabel for NIfTI, SimpleITK otherwise) or force one. SimpleITK can
            read NIfTI too; both give the same array and affine.

    Returns:
        The :class:`Image`.

    Raises:
        InputError: missing, unsupported, truncated or non-image file, or wrong dimensionality
            (one line naming the file).
    """
    p = Path(path)
    suffix = _check_readable(p)
    use_nib = backend == "nibabel" or (backend == "auto" and suffix in NIFTI_SUFFIXES)
    try:
        if use_nib:
            if suffix not in NIFTI_SUFFIXES:
                raise InputError(f"{p}: nibabel backend reads NIfTI only")
            img = nib.load(str(p))
            array = np.asanyarray(img.dataobj)
            header = img.header.copy()
            affine = np.asarray(img.affine, dtype=np.float64)
            zooms = tuple(float(z) for z in header.get_zooms()[:3])
            spacing = (zooms + (1.0, 1.0, 1.0))[:3]
        else:
            simg = sitk.ReadImage(str(p))
            array = sitk.GetArrayFromImage(simg)
            n_comp = simg.GetNumberOfComponentsPerPixel()
            spatial = array.ndim - (1 if n_comp > 1 else 0)
            order = tuple(reversed(range(spatial))) + ((spatial,) if n_comp > 1 else ())
            array = np.ascontiguousarray(np.transpose(array, order))
            affine = _sitk_affine(simg) if simg.GetDimension() >= 3 else np.eye(4)
            header = None
            spacing = spacing_from_affine(affine)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read image ({_one_line(exc)})") from None
    array = _squeeze_to(array, ndim, p)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Image(array=array, affine=affine, spacing=spacing, header=header, path=p)


def _nifti_for(array: np.ndarray, affine: np.ndarray, like: Image | None) -> nib.Nifti1Image:
    ref_header = like.header if like is not None else None
    if ref_header is not None and isinstance(ref_header, nib.Nifti1Header):
        header = ref_header.copy()
        header.set_data_dtype(array.dtype)
        img = nib.Nifti1Image(array, affine, header=header)
        # Keep the source's codes so viewers pick the same space; nibabel would otherwise
        # reset them when the affine is passed explicitly.
        _, scode = ref_header.get_sform(coded=True)
        _, qcode = ref_header.get_qform(coded=True)
        img.set_sform(affine, code=int(scode) if scode else 2)
        img.set_qform(affine, code=int(qcode) if qcode else 1)
        img.header.set_slope_inter(1.0, 0.0)
        zooms = list(ref_header.get_zooms())
        zooms[:3] = spacing_from_affine(affine)
        if array.ndim < len(zooms):
            zooms = zooms[: array.ndim]
        elif array.ndim > len(zooms):
            zooms = zooms + [1.0] * (array.ndim - len(zooms))
        img.header.set_zooms(zooms)
    else:
        img = nib.Nifti1Image(array, affine)
        img.set_sform(affine, code=2)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    if array.dtype.kind in "iub":
        img.header["cal_min"] = 0
        img.header["cal_max"] = float(array.max()) if array.size else 0.0
    else:
        img.header["cal_min"] = 0
        img.header["cal_max"] = 0
    return img


def _sitk_for(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    order = tuple(reversed(range(3))) + tuple(range(3, array.ndim))
    simg = sitk.GetImageFromArray(
        np.ascontiguousarray(np.transpose(array, order)), isVector=array.ndim > 3
    )
    spacing = np.asarray(spacing_from_affine(affine))
    direction_lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3] / spacing
    simg.SetSpacing(tuple(float(s) for s in spacing))
    simg.SetDirection(tuple(float(d) for d in direction_lps.ravel()))
    simg.SetOrigin(tuple(float(o) for o in _LPS_TO_RAS @ np.asarray(affine)[:3, 3]))
    return simg


def write_image(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
    *,
    like: Image | None = None,
) -> Path:
    """Write ``array`` with ``affine`` atomically; the format follows the extension.

    Args:
        path: destination (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd).
        array: ``(i, j, k[, ...])`` voxels; bool is stored as uint8.
        affine: 4x4 voxel-to-RAS+ matrix.
        like: source image whose NIfTI header fields (codes, units, extra pixdims) are copied.

    Returns:
        The written path.
    """
    p = Path(path)
    suffix = suffix_of(p)
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(
            f"{p}: unsupported output format '{suffix}' "
            f"(use one of {', '.join(SUPPORTED_SUFFIXES)})"
        )
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if suffix in NIFTI_SUFFIXES:
        img = _nifti_for(arr, np.asarray(affine, dtype=np.float64), like)
        with atomic_path(p) as tmp:
            nib.save(img, str(tmp))
        return p
    simg = _sitk_for(arr, affine)
    if suffix in (".mhd", ".nhdr"):
        # Header + detached data file: write both into a private temp dir under their final
        # names (so the header references the right data file), then move data, then header.
        p.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent))
        try:
            sitk.WriteImage(simg, str(tmpdir / p.name), useCompression=False)
            produced = sorted(tmpdir.iterdir(), key=lambda f: f.name == p.name)
            for f in produced:
                os.replace(f, p.parent / f.name)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return p
    with atomic_path(p) as tmp:
        sitk.WriteImage(simg, str(tmp), useCompression=True)
    return p


def write_like(path: str | os.PathLike[str], array: np.ndarray, reference: Image) -> Path:
    """Write ``array`` (same spatial shape as ``reference``) with the reference's geometry.

    Raises:
        ValueError: the spatial shape differs from the reference's.
    """
    if tuple(array.shape[:3]) != tuple(reference.array.shape[:3]):
        raise ValueError(
            f"array shape {tuple(array.shape)} does not match reference "
            f"{tuple(reference.array.shape)}"
        )
    return write_image(path, array, reference.affine, like=reference)


def affines_close(
    a: np.ndarray, b: np.ndarray, *, atol_mm: float = 1e-3, rtol: float = 1e-4
) -> bool:
    """Whether two affines describe the same grid within tolerances (mm for the origin)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(float(np.abs(a[:3, :3]).max()), 1.0)
    return bool(
        np.allclose(a[:3, :3], b[:3, :3], atol=rtol * scale, rtol=0)
        and np.allclose(a[:3, 3], b[:3, 3], atol=atol_mm, rtol=0)
    )


# ------------------------------------------------------------------------------ orientation

#: nibabel orientation (3x2: target axis, flip per array axis) of arrays already in RAS order.
CANONICAL_ORIENTATION = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


def axis_codes(affine: np.ndarray) -> str:
    """The world direction each array axis points to, e.g. ``RAS`` or ``LPS``."""
    return "".join(nib.aff2axcodes(affine))


def orientation_of(affine: np.ndarray) -> np.ndarray:
    """The 3x2 orientation (nibabel's) that takes arrays of ``affine`` to RAS axis order."""
    return nib.orientations.io_orientation(affine)


def reorient(array: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """An ``(X, Y, Z)`` array reordered and flipped by a 3x2 orientation (a view if it can)."""
    return nib.orientations.apply_orientation(array, orientation)


def reoriented_affine(
    affine: np.ndarray, orientation: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """The affine of an array of ``shape`` after :func:`reorient` (world positions unchanged)."""
    return affine @ nib.orientations.inv_ornt_aff(orientation, shape)


def orientation_between(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The orientation that takes arrays in orientation ``start`` to orientation ``end``."""
    return nib.orientations.ornt_transform(start, end)


def describe(value: Any) -> str:
    """Short text for a shape or spacing tuple in error messages."""
    if isinstance(value, tuple | list):
        return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


__all__ = [
    "Image",
    "ImageInfo",
    "SUPPORTED_SUFFIXES",
    "affines_close",
    "describe",
    "is_image_file",
    "read_image",
    "read_info",
    "spacing_from_affine",
    "strip_suffix",
    "suffix_of",
    "write_image",
    "write_like",
]
