"""Tests for segmenter.preprocessing.cache: same arrays as in-memory preprocessing, keys, reuse in
training."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from segmenter.config import ChannelNormalization, load_config
from segmenter.data.layout import load_dataset
from segmenter.data.synthetic import PhantomSpec, write_dataset
from segmenter.preprocessing.cache import cache_key, cached_case, entry_folder, is_cached
from segmenter.preprocessing.case import preprocess_case
from segmenter.preprocessing.spec import PreprocessingSpec
from segmenter.training.loop import fit

ONE_MM = PreprocessingSpec(target_spacing=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = PhantomSpec(size=32, spacing=(1.0, 1.0, 1.5), oblique=True)
    return write_dataset(tmp_path_factory.mktemp("cache"), 4, seed=5, spec=spec)


def test_cached_case_equals_preprocessing_and_is_memory_mapped(
    dataset: Path, tmp_path: Path
) -> None:
    case = load_dataset(dataset).training[0]
    fresh = preprocess_case(case, ONE_MM)
    first = cached_case(case, tmp_path, ONE_MM)
    (folder,) = list(tmp_path.iterdir())
    assert folder.name.startswith(case.case_id) and (folder / "meta.json").is_file()
    again = cached_case(case, tmp_path, ONE_MM)
    for pre in (first, again):
        assert isinstance(pre.image, np.memmap) and isinstance(pre.label, np.memmap)
        np.testing.assert_array_equal(pre.image, fresh.image)
        np.testing.assert_array_equal(pre.label, fresh.label)  # type: ignore[arg-type]
        assert pre.box == fresh.box and pre.spacing == fresh.spacing
        np.testing.assert_allclose(pre.affine, fresh.affine)
        prob = np.asarray(pre.label, dtype=np.float32)
        np.testing.assert_array_equal(pre.restore(prob), fresh.restore(prob))
    assert len(list(tmp_path.iterdir())) == 1  # the second call read, did not write


def test_is_cached_sees_a_complete_entry_only_under_its_settings(
    dataset: Path, tmp_path: Path
) -> None:
    case = load_dataset(dataset).training[2]
    assert not is_cached(case, tmp_path, ONE_MM)
    cached_case(case, tmp_path, ONE_MM)
    assert is_cached(case, tmp_path, ONE_MM)
    assert not is_cached(case, tmp_path, PreprocessingSpec())
    (entry_folder(case, tmp_path, ONE_MM) / "meta.json").unlink()  # cut short before meta.json
    assert not is_cached(case, tmp_path, ONE_MM)


def test_key_follows_settings_and_files(dataset: Path) -> None:
    case = load_dataset(dataset).training[1]
    spec = PreprocessingSpec()
    key = cache_key(case, spec)
    assert key == cache_key(case, PreprocessingSpec())
    assert key != cache_key(case, PreprocessingSpec(crop_to_nonzero=False))
    assert key != cache_key(case, ONE_MM)
    assert key != cache_key(case, PreprocessingSpec(clip_percentiles=(0.5, 99.5)))
    mri = (ChannelNormalization(), ChannelNormalization())
    assert key == cache_key(case, PreprocessingSpec(normalization=mri))
    ct = ChannelNormalization(scheme="ct_clip_zscore", clip=(-1000.0, 1000.0), std=300.0)
    ct_key = cache_key(case, PreprocessingSpec(normalization=(ct, mri[0])))
    assert ct_key != key
    other = dataclasses.replace(ct, mean=10.0)
    assert ct_key != cache_key(case, PreprocessingSpec(normalization=(other, mri[0])))
    st = os.stat(case.images[0])
    os.utime(case.images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert key != cache_key(case, spec)


def test_training_reuses_the_cache(
    dataset: Path, tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    config = tiny_config(tmp_path / "tiny.yaml", dataset, {"data.cache_dir": cache})
    fit(load_config(config), tmp_path / "a", progress=False)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 4
    stamps = [(cache / e / "image.npy").stat().st_mtime_ns for e in entries]
    fit(load_config(config), tmp_path / "b", progress=False)
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert [(cache / e / "image.npy").stat().st_mtime_ns for e in entries] == stamps
