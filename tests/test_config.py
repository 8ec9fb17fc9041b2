from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from segmenter.config import (
    ACTIVATIONS,
    LOSS_NAMES,
    PRESET_NAMES,
    Config,
    ConfigError,
    EvaluationConfig,
    LossConfig,
    apply_overrides,
    dump_config,
    load_config,
    save_config,
)


def test_defaults_need_no_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.loss.name == "focal_dice"
    assert cfg.evaluation.preset == "isles22"


def test_name_lists_are_the_choices_of_their_fields() -> None:
    loss, evaluation = typing.get_type_hints(LossConfig), typing.get_type_hints(EvaluationConfig)
    assert typing.get_args(loss["name"]) == LOSS_NAMES == ("focal_dice", "dice_ce", "dice", "focal")
    assert typing.get_args(loss["activation"]) == ACTIVATIONS == ("sigmoid", "softmax")
    assert typing.get_args(evaluation["preset"]) == PRESET_NAMES
    assert PRESET_NAMES == ("isles22", "atlas", "brats23", "msseg", "panoptica")


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss.gamma = 3.0  # type: ignore[misc]


def test_yaml_names_only_what_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  gamma: 3\n  alpha: 0.25\n")
    cfg = load_config(path)
    assert cfg.loss.gamma == 3.0 and isinstance(cfg.loss.gamma, float)
    assert cfg.loss.alpha == 0.25
    assert cfg.loss.lambda_dice == 1.0


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  gamme: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.gamme'; valid keys.*gamma"):
        load_config(path)
    path.write_text("losses:\n  gamma: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'losses'.*data, augment, model"):
        load_config(path)


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  gamma: [1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.gamma=abc", r"loss.gamma: expected a number, got 'abc'"),
        ("loss.name=bce", r"loss.name: 'bce' is not one of: focal_dice, dice_ce, dice, focal"),
        ("loss.batch_dice=1", r"loss.batch_dice: expected true or false"),
        ("loss.gamma=-1", r"loss.gamma must be >= 0"),
        ("loss.alpha=2", r"loss.alpha must be in \[0, 1\]"),
        ("loss.nope=1", r"unknown config key 'loss.nope' in override; valid keys in loss: name"),
        ("nope.gamma=1", r"unknown config section 'nope'"),
        ("loss.gamma", r"not of the form key=value"),
        ("evaluation.size_bins_mm3=[10, 5]", r"at least two increasing edges"),
        ("data.normalization=[{scheme: ct_clip_zscore}]", r"ct_clip_zscore needs clip"),
        ("data.normalization=[{scheme: ct_clip_zscore, clip: [1, 0]}]", r"lo < hi"),
        ("data.normalization=[{scheme: ct_clip_zscore, clip: [0, 1], std: 0}]", r"std must be"),
        ("data.normalization=[{scheme: ct}]", r"'ct' is not one of"),
        ("data.normalization=[{schem: ct}]", r"unknown config key 'data.normalization\[0\].schem'"),
    ],
)
def test_bad_overrides_fail_with_one_clear_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        apply_overrides(load_config(), [override])
    assert "\n" not in str(err.value)


def test_overrides_are_typed_and_applied_in_order() -> None:
    cfg = apply_overrides(
        load_config(),
        [
            "loss.gamma=1",
            "loss.gamma=1.5",
            "loss.alpha=null",
            "loss.weight=[1, 10]",
            "loss.activation=softmax",
            "evaluation.size_bins_mm3=[0, 3, inf]",
        ],
    )
    assert cfg.loss.gamma == 1.5
    assert cfg.loss.alpha is None
    assert cfg.loss.weight == (1.0, 10.0)
    assert cfg.loss.activation == "softmax"
    assert cfg.evaluation.size_bins_mm3 == (0.0, 3.0, math.inf)


def test_saved_config_loads_back_equal(tmp_path: Path) -> None:
    ct = "{channel: CT, scheme: ct_clip_zscore, clip: [-1000, 1500], mean: 40, std: 300}"
    cfg = apply_overrides(
        load_config(),
        ["loss.alpha=0.25", "loss.weight=[1, 2]", f"data.normalization=[{ct}, {{}}]"],
    )
    assert cfg.data.normalization[0].clip == (-1000.0, 1500.0)
    assert cfg.data.normalization[1].scheme == "zscore_nonzero"
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert "alpha: 0.25" in dump_config(cfg)


def test_config_module_does_not_import_torch() -> None:
    code = "import sys, segmenter.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
