"""Medical image I/O: the only module that touches nibabel and SimpleITK.

Convention for every format: the array is indexed ``[i, j, k]`` in the file's own voxel order
(NIfTI order; SimpleITK's ``(z, y, x)`` arrays are transposed to it), and ``affine`` is the 4x4
matrix mapping ``(i, j, k, 1)`` to RAS+ world coordinates in mm (nibabel's convention; ITK's LPS
direction/origin are converted). ``spacing`` is the voxel size in mm along ``i, j, k``.

NIfTI (.nii, .nii.gz) is read and written with nibabel; .nrrd, .nhdr, .mha and .mhd with
SimpleITK. A mask or probability map written with :func:`write_like` carries the source's
geometry (affine, sform and qform codes, pixdim, xyzt units), so it overlays the scan in a viewer.
Every write is atomic.

Reading checks that the file can describe a 3D scan before any voxel is loaded, and refuses
(:class:`HeaderError`, one line naming the file) what other tools would read differently or not at
all: voxel sizes that are not positive and finite, invalid transform codes or quaternions, a
non-finite or singular affine, a qform and an sform that place the scan differently, voxel sizes
(pixdim) that disagree with the affine, an infinite scaling slope, complex or RGB voxels, and a
header that claims more voxel bytes than the file can hold (checked against the file size, or
for gzip against the most it can expand to and, for large claims, by counting the decompressed
bytes, so a lying header never makes it allocate the volume). A NaN or zero ``scl_slope`` means
no scaling (the NIfTI convention nibabel writes by default).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterator
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

#: Most bytes one compressed byte can expand to with deflate (zlib's documented limit, 1032:1):
#: a gzip file claiming more voxel bytes than this allows is refused without decompressing it.
MAX_DEFLATE_RATIO = 1032
#: Claimed voxel payloads above this many bytes (gzip) are counted by decompressing in chunks
#: before the array is allocated, so a truncated file claiming a large volume costs no memory.
STREAM_CHECK_BYTES = 64 * 2**20
#: Relative tolerance between pixdim and the affine's column norms, and between qform and sform.
GEOMETRY_RTOL = 1e-3
#: Tolerance on the qform/sform origins, as a fraction of the smallest voxel size.
ORIGIN_VOXEL_FRACTION = 1e-2


class HeaderError(InputError):
    """A header that cannot describe a 3D scan we can read safely (the message names the file)."""


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


def _size_text(n_bytes: float) -> str:
    """``n_bytes`` as a short human figure (``12.3 MB``, ``256 TB``)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def _header_class(path: Path) -> type[nib.Nifti1Header] | None:
    """NIfTI-1 or NIfTI-2 from ``sizeof_hdr`` (either byte order), None when it is neither."""
    with nib.openers.ImageOpener(str(path)) as f:
        first = f.read(4)
    if len(first) < 4:
        return None
    sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")}
    if 540 in sizes:
        return nib.Nifti2Header
    return nib.Nifti1Header if 348 in sizes else None


def _check_raw_nifti(path: Path, raw: nib.Nifti1Header) -> None:
    """Refuse header fields that nibabel would silently 'fix' or that tools read differently.

    ``raw`` is read with ``check=False``: nibabel's loader would replace a zero pixdim by 1, a
    negative one by its absolute value and an unknown transform code by 0, each a guess another
    tool does not make.
    """
    n_dims = int(raw["dim"][0])
    if not 1 <= n_dims <= 7:
        raise HeaderError(f"{path}: dim[0] (number of dimensions) is not 1-7 in either byte order")
    extents = [int(d) for d in raw["dim"][1 : n_dims + 1]]
    if min(extents) < 1:
        raise HeaderError(f"{path}: dim {describe(extents)} has no voxels (an extent below 1)")
    pixdim = [float(v) for v in raw["pixdim"][1 : min(n_dims, 3) + 1]]
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise HeaderError(
            f"{path}: voxel size (pixdim) {describe(pixdim)} mm is not positive and finite"
        )
    codes = nib.nifti1.xform_codes.value_set()
    for name in ("qform_code", "sform_code"):
        if int(raw[name]) not in codes:
            raise HeaderError(f"{path}: {name} {int(raw[name])} is not a NIfTI code (0-5)")
    if int(raw["qform_code"]) > 0:
        quat = [float(raw[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
        offset = [float(raw[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
        qfac = float(raw["pixdim"][0])
        if not all(map(math.isfinite, quat)) or sum(q * q for q in quat) > 1 + 1e-6:
            raise HeaderError(f"{path}: qform quaternion {describe(quat)} is not a rotation")
        if not all(map(math.isfinite, offset)):
            raise HeaderError(f"{path}: qform offset {describe(offset)} mm is not finite")
        if qfac not in (-1.0, 0.0, 1.0):
            raise HeaderError(f"{path}: qfac (pixdim[0]) {qfac:g} is not -1 or 1")
    if int(raw["sform_code"]) > 0:
        srows = np.stack([raw["srow_x"], raw["srow_y"], raw["srow_z"]]).astype(np.float64)
        if not np.isfinite(srows).all():
            raise HeaderError(f"{path}: sform (srow_x/y/z) has non-finite entries")
    if math.isinf(float(raw["scl_slope"])):
        raise HeaderError(f"{path}: scl_slope is {float(raw['scl_slope']):g}")
    offset, first = float(raw["vox_offset"]), int(raw["sizeof_hdr"]) + 4
    if bytes(raw["magic"]).startswith((b"n+1", b"n+2")) and 0 <= offset < first:
        raise HeaderError(
            f"{path}: vox_offset {offset:g} lies inside the header (voxels start at byte "
            f"{first} or later): nibabel would read the header as voxels, niftilib would not"
        )


def _check_affine(path: Path, affine: np.ndarray, spacing: tuple[float, ...]) -> None:
    """Refuse a non-finite or singular affine, and voxel sizes the affine contradicts.

    Args:
        path: the file, for the message.
        affine: its 4x4 voxel-to-world matrix.
        spacing: the voxel sizes its header states, one per spatial axis it has (up to 3).
    """
    if not np.isfinite(affine).all():
        raise HeaderError(f"{path}: the affine has non-finite entries")
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if norms.min() == 0 or abs(np.linalg.det(matrix)) <= 1e-6 * float(np.prod(norms)):
        raise HeaderError(f"{path}: the affine is singular (its voxel axes do not span 3D space)")
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise HeaderError(f"{path}: voxel size {describe(spacing)} mm is not positive and finite")
    stated = norms[: len(spacing)]
    if not np.allclose(spacing, stated, rtol=GEOMETRY_RTOL, atol=0):
        raise HeaderError(
            f"{path}: voxel size (pixdim) {describe(spacing)} mm disagrees with the affine's "
            f"{describe(tuple(round(float(v), 6) for v in stated))} mm"
        )


def _forms_distance(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]
) -> tuple[float, float]:
    """How far two affines place the scan apart: origins in mm, axes in voxels."""
    origin_mm = float(np.abs(a[:3, 3] - b[:3, 3]).max())
    axes = float(np.abs(a[:3, :3] - b[:3, :3]).max()) / max(min(spacing), 1e-12)
    return origin_mm, axes


def _check_forms_agree(path: Path, header: nib.Nifti1Header, spacing: tuple[float, ...]) -> None:
    """Refuse a qform and an sform that both claim to place the scan, in different places.

    A qform can only hold a rotation, so for a sheared sform writers store its nearest rigid
    transform: a qform equal to the one nibabel derives from the sform agrees with it.
    """
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not (qcode and scode) or qform is None or sform is None:
        return
    origin_mm, axes = _forms_distance(qform, sform, spacing)
    if origin_mm <= ORIGIN_VOXEL_FRACTION * min(spacing) and axes <= GEOMETRY_RTOL:
        return
    derived = header.copy()
    derived.set_qform(sform, code=int(qcode))
    near_mm, near_axes = _forms_distance(qform, derived.get_qform(), spacing)
    if near_mm <= ORIGIN_VOXEL_FRACTION * min(spacing) and near_axes <= GEOMETRY_RTOL:
        return
    raise HeaderError(
        f"{path}: qform and sform disagree (origins {origin_mm:.3g} mm apart, voxel axes "
        f"{axes:.3g} voxel apart); tools that use one or the other place the scan "
        f"differently: make them equal (e.g. fslorient -copysform2qform)"
    )


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    """Refuse voxel types that are not one real number per voxel."""
    if dtype.kind == "c":
        raise HeaderError(
            f"{path}: complex voxels ({dtype}) are not supported: store the magnitude as a "
            f"real-valued image"
        )
    if dtype.kind not in "biuf":
        raise HeaderError(
            f"{path}: voxel type {dtype} is not one real number per voxel (RGB or vector data?)"
        )


def _gzip_payload(path: Path, need: int) -> int:
    """Decompressed bytes of a gzip file, counted in chunks up to ``need`` (nothing kept); a
    stream cut short or damaged counts what decompressed before the damage."""
    total = 0
    with contextlib.suppress(EOFError, OSError, zlib.error), gzip.open(path, "rb") as f:
        while total < need:
            chunk = f.read(min(8 * 2**20, need - total))
            if not chunk:
                break
            total += len(chunk)
    return total


def _check_payload(path: Path, img: nib.Nifti1Image, *, count: bool, always: bool = False) -> None:
    """Refuse a header that claims more voxel bytes than the file holds, before reading them.

    Args:
        path: the file.
        img: its nibabel image (header and array proxy; no voxel read yet).
        count: for gzip claims above :data:`STREAM_CHECK_BYTES`, also count the decompressed
            bytes (reading, not keeping, them); otherwise only the size bounds are checked.
        always: count whatever the claim (after nibabel failed to read the voxels).
    """
    shape = tuple(int(n) for n in img.dataobj.shape)
    offset = int(img.dataobj.offset)
    payload = math.prod(shape) * img.get_data_dtype().itemsize
    need = offset + payload
    size = path.stat().st_size
    compressed = suffix_of(path) == ".nii.gz"
    most = size * MAX_DEFLATE_RATIO if compressed else size
    held = None
    if need > most:
        held = f"a file of {_size_text(size)} can hold at most {_size_text(most)}"
    elif compressed and count and (always or need > STREAM_CHECK_BYTES):
        found = _gzip_payload(path, need)
        if found < need:
            held = f"the file holds {_size_text(found)} in all"
    if held is not None:
        raise InputError(
            f"{path}: header claims {describe(shape)} voxels ({_size_text(payload)} from byte "
            f"{offset}) but {held} (a truncated file, or a wrong dim or vox_offset?)"
        )


class _QuietNibabel(logging.Filter):
    """Drops nibabel's header-fix log records in the threads reading a header through us.

    nibabel logs (and applies) its own guesses for broken header fields; the checks here refuse
    those fields with one line instead, so its records would only repeat or contradict it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "active", False)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Quiet while the block runs, in this thread only."""
        logger = logging.getLogger("nibabel.global")
        if self not in logger.filters:
            logger.addFilter(self)
        self.local.active = True
        try:
            yield
        finally:
            self.local.active = False


_QUIET_NIBABEL = _QuietNibabel()


def _check_datatype(path: Path, raw: nib.Nifti1Header) -> None:
    """Refuse a datatype code that is not NIfTI's or that nibabel cannot map to numpy."""
    code = int(raw["datatype"])
    codes = nib.nifti1.data_type_codes
    if code not in codes.value_set():
        raise HeaderError(f"{path}: datatype {code} is not a NIfTI data type")
    if codes.dtype[code].itemsize == 0:  # nibabel knows the code but has no numpy type for it
        raise HeaderError(f"{path}: datatype {code} ({codes.label[code]}) is not supported")


def _load_nifti(path: Path, *, count: bool) -> nib.Nifti1Image:
    """nibabel's image of a NIfTI file whose header passed every check (no voxel read)."""
    klass = _header_class(path)
    if klass is not None:
        with nib.openers.ImageOpener(str(path)) as f:
            raw = klass.from_fileobj(f, check=False)
        _check_raw_nifti(path, raw)
        _check_datatype(path, raw)
    with _QUIET_NIBABEL.active():
        img = nib.load(str(path))
    if klass is None:  # nibabel found a NIfTI magic string behind a wrong header size
        raise HeaderError(f"{path}: sizeof_hdr is neither 348 (NIfTI-1) nor 540 (NIfTI-2)")
    header = img.header
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    _check_affine(path, np.asarray(img.affine, dtype=np.float64), spacing)
    _check_forms_agree(path, header, spacing)
    _check_dtype(path, img.get_data_dtype())
    _check_payload(path, img, count=count)
    return img


def _nifti_voxels(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The voxels of a checked image; a payload cut short is named as such."""
    try:
        with _QUIET_NIBABEL.active():
            return np.asanyarray(img.dataobj)
    except Exception as exc:
        if suffix_of(path) == ".nii.gz":
            _check_payload(path, img, count=True, always=True)  # names a payload cut short
        raise InputError(f"{path}: cannot read image ({_one_line(exc)})") from None


def _check_itk_payload(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse an ITK header (.nrrd, .mha) that claims more voxels than its file could hold."""
    if suffix_of(path) not in (".nrrd", ".mha"):
        return  # a detached header's data lie in another file
    payload = math.prod(shape) * itemsize
    size = path.stat().st_size
    if payload > size * MAX_DEFLATE_RATIO:
        raise HeaderError(
            f"{path}: header claims {describe(shape)} voxels ({_size_text(payload)}) but a "
            f"{_size_text(size)} file can hold at most {_size_text(size * MAX_DEFLATE_RATIO)}"
        )


def _itk_info(p: Path) -> ImageInfo:
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
    _check_affine(p, affine, spacing)
    pixel = sitk.Image([1] * dim, reader.GetPixelID(), n_comp)
    dtype = sitk.GetArrayViewFromImage(pixel).dtype
    _check_dtype(p, dtype)
    _check_itk_payload(p, shape, dtype.itemsize)
    return ImageInfo(p, shape, affine, spacing, None)


def read_info(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image file's geometry without loading its voxels.

    The header is checked as :func:`read_image` checks it (see the module docstring), except
    that a gzip payload is only bounded, not counted.

    Raises:
        HeaderError: a header that cannot describe a 3D scan safely (one line naming the file).
        InputError: missing, unsupported or unreadable file (one line naming the file).
    """
    p = Path(path)
    suffix = _check_readable(p)
    try:
        if suffix in NIFTI_SUFFIXES:
            img = _load_nifti(p, count=False)
            shape = tuple(int(s) for s in img.shape)
            zooms = img.header.get_zooms()
            spacing = tuple(float(z) for z in (tuple(zooms) + (1.0, 1.0, 1.0))[:3])
            return ImageInfo(p, shape, np.asarray(img.affine), spacing, img.get_data_dtype())
        return _itk_info(p)
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
        HeaderError: a header that cannot describe a 3D scan safely, checked before any voxel is
            read (see the module docstring).
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
            img = _load_nifti(p, count=True)
            array = _nifti_voxels(p, img)
            header = img.header.copy()
            affine = np.asarray(img.affine, dtype=np.float64)
            zooms = tuple(float(z) for z in header.get_zooms()[:3])
            spacing = (zooms + (1.0, 1.0, 1.0))[:3]
        else:
            if suffix in NIFTI_SUFFIXES:
                _load_nifti(p, count=True)  # the same header checks as the nibabel path
            else:
                _itk_info(p)
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
    _check_dtype(p, array.dtype)
    array = _squeeze_to(array, ndim, p)
    if dtype is not None:
        array = _cast(array, np.dtype(dtype), p)
    return Image(array=array, affine=affine, spacing=spacing, header=header, path=p)


def _cast(array: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """``array`` as ``dtype``; refuses finite values the target float type cannot hold (a huge
    ``scl_slope`` scales voxels past float32), which would turn into inf silently."""
    if dtype.kind == "f" and array.dtype.kind == "f" and array.dtype.itemsize > dtype.itemsize:
        finite = array[np.isfinite(array)]
        largest = float(np.abs(finite).max()) if finite.size else 0.0
        if largest > float(np.finfo(dtype).max):
            raise HeaderError(
                f"{path}: voxel values up to {largest:.3g} (after scl_slope/scl_inter scaling) "
                f"exceed the {dtype} range"
            )
    return array.astype(dtype, copy=False)


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
    "GEOMETRY_RTOL",
    "HeaderError",
    "Image",
    "ImageInfo",
    "MAX_DEFLATE_RATIO",
    "ORIGIN_VOXEL_FRACTION",
    "STREAM_CHECK_BYTES",
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
