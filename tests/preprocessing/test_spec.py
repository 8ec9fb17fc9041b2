"""Tests for segmenter.preprocessing.spec: one value for the preprocessing settings."""

from __future__ import annotations

from segmenter.config import ChannelNormalization, load_config
from segmenter.preprocessing.spec import PreprocessingSpec


def test_the_spec_of_a_config_holds_its_four_settings() -> None:
    cfg = load_config(None, ["data.target_spacing=[1, 1, 2]", "data.crop_to_nonzero=false",
                             "data.clip_percentiles=[1, 99]"])  # fmt: skip
    spec = PreprocessingSpec.from_data(cfg.data)
    assert spec == PreprocessingSpec(
        crop_to_nonzero=False, target_spacing=(1.0, 1.0, 2.0), clip_percentiles=(1.0, 99.0)
    )
    assert PreprocessingSpec.from_data(load_config(None, []).data).clip_percentiles == (0.5, 99.5)


def test_mri_cache_settings_are_those_written_before_the_spec_existed() -> None:
    # the cache key hashes these; MRI caches made before CT support must keep their keys
    spec = PreprocessingSpec(target_spacing=(1, 1, 1), clip_percentiles=(0.5, 99.5),
                             normalization=(ChannelNormalization(channel="FLAIR"),))  # fmt: skip
    assert spec.cache_settings() == {
        "crop_to_nonzero": True, "target_spacing": [1.0, 1.0, 1.0],
        "clip_percentiles": [0.5, 99.5],
    }  # fmt: skip
    assert not spec.has_ct


def test_ct_channels_join_the_cache_settings_without_their_names() -> None:
    ct = ChannelNormalization("ct_clip_zscore", "CT", (-100, 200), 5, 9)
    spec = PreprocessingSpec(normalization=(ct, ChannelNormalization()))
    assert spec.has_ct
    assert spec.cache_settings()["normalization"] == [
        {"scheme": "ct_clip_zscore", "clip": [-100.0, 200.0], "mean": 5.0, "std": 9.0},
        {"scheme": "zscore_nonzero", "clip": None, "mean": 0.0, "std": 1.0},
    ]
