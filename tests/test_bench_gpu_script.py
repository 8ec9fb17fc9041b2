"""scripts/bench_gpu.py: without CUDA it says it skipped and exits 0; its settings are valid
configs."""

from __future__ import annotations

import pytest
import torch
from tiny import load_script

from segmenter.config import apply_values, load_config


def test_without_cuda_it_skips_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    bench = load_script("bench_gpu")
    assert bench.main(["--steps", "1"]) == 0
    assert "no CUDA device: GPU benchmark skipped" in capsys.readouterr().out


def test_every_setting_is_a_valid_config() -> None:
    bench = load_script("bench_gpu")
    for _label, path, values in bench.SETTINGS:
        cfg = apply_values(load_config(bench.ROOT / path), {**values, "train.device": "cpu"})
        assert cfg.data.batch_size >= 1
    gpu = bench.SETTINGS[2][2]
    assert gpu["model.base_filters"] == 32 and gpu["model.encoder_convs"] == [2]
