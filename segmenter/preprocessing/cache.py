"""On-disk cache of preprocessed cases: uncompressed ``.npy`` arrays read memory-mapped.

Preprocessing (reading compressed NIfTI, reorienting, cropping, resampling, normalising) is
the same for every run on a dataset with the same settings, so ``data.cache_dir`` keeps it:

- one folder per case, ``{case_id}-{key}``, holding ``image.npy`` (float32), ``label.npy``
  (uint8, when labelled) and ``meta.json`` (crop box, affine, spacing, shapes, orientation),
  written last, so a folder without it is incomplete and rebuilt;
- the key hashes the cache format version, the preprocessing settings
  (:meth:`~segmenter.preprocessing.spec.PreprocessingSpec.cache_settings`) and every input
  file's resolved path, size and modification time: a changed setting or file gets a new entry;
- arrays are opened with ``numpy.load(mmap_mode="r")``: training reads only the patches it
  samples, and forked loader workers share the pages.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segmenter.atomic import atomic_path, write_text
from segmenter.preprocessing.case import PreprocessedCase, preprocess_case
from segmenter.preprocessing.geometry import CropBox
from segmenter.preprocessing.spec import PreprocessingSpec

if TYPE_CHECKING:
    from segmenter.data.layout import Case

#: Bumped whenever preprocessing changes what it produces.
CACHE_VERSION = 1


def cache_key(case: Case, spec: PreprocessingSpec) -> str:
    """16 hex digits identifying the case's files, the label values its dataset declares (a
    label is checked against them when it is read) and the preprocessing settings
    (:meth:`PreprocessingSpec.cache_settings`)."""
    h = hashlib.sha256()
    settings = {"version": CACHE_VERSION, **spec.cache_settings()}
    if case.label_values is not None:
        settings["label_values"] = list(case.label_values)
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in [*case.images, *([case.label] if case.label is not None else [])]:
        st = os.stat(path)
        h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def entry_folder(case: Case, cache_dir: str | Path, spec: PreprocessingSpec) -> Path:
    """The cache folder of ``case`` under these settings (``{case_id}-{key}``)."""
    return Path(cache_dir) / f"{case.case_id}-{cache_key(case, spec)}"


def is_cached(case: Case, cache_dir: str | Path, spec: PreprocessingSpec) -> bool:
    """Whether the cache holds ``case`` complete under these settings (no voxel is read)."""
    return (entry_folder(case, cache_dir, spec) / "meta.json").is_file()


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))


def _meta(pre: PreprocessedCase) -> dict[str, Any]:
    return {
        "case_id": pre.case_id,
        "box": {"lo": list(pre.box.lo), "hi": list(pre.box.hi), "shape": list(pre.box.shape)},
        "affine": np.asarray(pre.affine).tolist(),
        "spacing": list(pre.spacing),
        "original_shape": list(pre.original_shape),
        "orientation": None if pre.orientation is None else pre.orientation.tolist(),
        "has_label": pre.label is not None,
    }


def _load(folder: Path) -> PreprocessedCase:
    meta = json.loads((folder / "meta.json").read_text())
    box = meta["box"]
    label = np.load(folder / "label.npy", mmap_mode="r") if meta["has_label"] else None
    return PreprocessedCase(
        case_id=meta["case_id"],
        image=np.load(folder / "image.npy", mmap_mode="r"),
        label=label,
        box=CropBox(tuple(box["lo"]), tuple(box["hi"]), tuple(box["shape"])),
        affine=np.asarray(meta["affine"], dtype=np.float64),
        spacing=tuple(float(v) for v in meta["spacing"]),
        original_shape=tuple(int(n) for n in meta["original_shape"]),
        orientation=None if meta["orientation"] is None else np.asarray(meta["orientation"]),
    )


def cached_case(
    case: Case, cache_dir: str | Path, spec: PreprocessingSpec | None = None
) -> PreprocessedCase:
    """The preprocessed case from the cache, preprocessing and storing it first if needed.

    Raises:
        InputError: as :func:`segmenter.preprocessing.case.preprocess_case`.
    """
    spec = spec or PreprocessingSpec()
    folder = entry_folder(case, cache_dir, spec)
    if (folder / "meta.json").is_file():
        return _load(folder)
    pre = preprocess_case(case, spec)
    _save_array(folder / "image.npy", pre.image)
    if pre.label is not None:
        _save_array(folder / "label.npy", pre.label)
    write_text(folder / "meta.json", json.dumps(_meta(pre), indent=1))
    return _load(folder)
