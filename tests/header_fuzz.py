"""A seeded fuzzer of NIfTI header faults (issue 14, item 2).

:func:`fuzzed_nifti` writes a small, valid NIfTI with nibabel and then sets one to three raw
header fields (pixdim, qform and sform codes, quaternion and offsets, sform rows, dim, datatype,
scl_slope and scl_inter, vox_offset) to values drawn from a pool of the edge cases real files
carry: zero, negative, NaN, infinite, huge and tiny numbers, codes outside the standard, extents
past the payload. Example ``k`` of seed ``s`` is always the same file, so a failure is replayed
from its test id. No pytest here: scripts can draw more examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from bad_input_cases import patch_header

#: Numbers a broken header holds where a positive size or a finite coordinate belongs.
EDGE_NUMBERS = (0.0, -1.0, -0.5, math.nan, math.inf, -math.inf, 1e-30, 1e30, 3.4e38)
#: NIfTI datatype codes, the unsupported ones (binary, float128, complex256, RGBA) included,
#: and two that are no NIfTI code at all.
DATATYPES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 1, 999)
#: Transform codes: the standard's 0-5, and values past it.
XFORM_CODES = (0, 1, 2, 3, 4, 5, 6, -1, 255)


def _number(rng: np.random.Generator, low: float = -3.0, high: float = 3.0) -> float:
    """An edge number half of the time, else a plain one in ``[low, high]``."""
    if rng.random() < 0.5:
        return float(rng.choice(EDGE_NUMBERS))
    return float(rng.uniform(low, high))


def _pixdim(rng: np.random.Generator) -> dict[str, Any]:
    return {f"pixdim__{int(rng.integers(0, 4))}": _number(rng, 0.1, 5.0)}


def _codes(rng: np.random.Generator) -> dict[str, Any]:
    name = "qform_code" if rng.random() < 0.5 else "sform_code"
    return {name: int(rng.choice(XFORM_CODES))}


def _quaternion(rng: np.random.Generator) -> dict[str, Any]:
    names = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
    name = names[int(rng.integers(0, len(names)))]
    return {name: _number(rng, -1.0, 1.0) if name.startswith("quatern") else _number(rng)}


def _srow(rng: np.random.Generator) -> dict[str, Any]:
    row = [_number(rng) for _ in range(4)] if rng.random() < 0.5 else [0.0, 0.0, 0.0, 0.0]
    return {("srow_x", "srow_y", "srow_z")[int(rng.integers(0, 3))]: row}


def _dim(rng: np.random.Generator) -> dict[str, Any]:
    index = int(rng.integers(0, 6))
    choices = (0, 1, 2, 3, 4, 5, 7, 8, -1) if index == 0 else (0, 1, -1, 2, 9, 300, 32767)
    return {f"dim__{index}": int(rng.choice(choices))}


def _datatype(rng: np.random.Generator) -> dict[str, Any]:
    code = int(rng.choice(DATATYPES))
    bits = nib.nifti1.data_type_codes.dtype[code].itemsize * 8 if code != 999 else 8
    return {"datatype": code, "bitpix": bits if rng.random() < 0.8 else 3}


def _scaling(rng: np.random.Generator) -> dict[str, Any]:
    name = "scl_slope" if rng.random() < 0.6 else "scl_inter"
    return {name: _number(rng, -5.0, 5.0)}


def _vox_offset(rng: np.random.Generator) -> dict[str, Any]:
    return {"vox_offset": float(rng.choice((0.0, 352.0, 351.0, 100.0, 368.0, 1e6, math.nan)))}


#: One drawer per header field family; each returns the raw fields to set.
FIELDS: tuple[Callable[[np.random.Generator], dict[str, Any]], ...] = (
    _pixdim, _codes, _quaternion, _srow, _dim, _datatype, _scaling, _vox_offset,
)  # fmt: skip


def header_faults(seed: int, example: int) -> dict[str, Any]:
    """The raw fields example ``example`` of ``seed`` sets (one to three field families)."""
    rng = np.random.default_rng([seed, example])
    fields: dict[str, Any] = {}
    for draw in rng.choice(len(FIELDS), size=int(rng.integers(1, 4)), replace=False):
        fields.update(FIELDS[int(draw)](rng))
    return fields


def base_image(seed: int) -> nib.Nifti1Image:
    """The valid image every example starts from: 6x7x5 finite float32 voxels, both forms set
    to the same oblique-free affine with 1 x 1.5 x 2 mm voxels."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-3.0, 4.0, 10.0]
    img = nib.Nifti1Image(rng.normal(100.0, 20.0, (6, 7, 5)).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    return img


def fuzzed_nifti(path: Path, seed: int, example: int) -> dict[str, Any]:
    """Write example ``example`` of ``seed`` to ``path`` (``.nii.gz`` or ``.nii``); returns the
    raw fields it set."""
    nib.save(base_image(seed), path)
    fields = header_faults(seed, example)
    patch_header(path, **fields)
    return fields


__all__ = ["FIELDS", "base_image", "fuzzed_nifti", "header_faults"]
