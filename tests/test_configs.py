from __future__ import annotations

from pathlib import Path

import pytest

from segmenter.config import Config, config_to_dict, load_config
from segmenter.workflows.demo import demo_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


EXPERIMENT_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "loss_comparison.yaml")


# loss_comparison.yaml is a variants file: workflows/test_compare.py loads it
@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_default_yaml_states_the_code_defaults() -> None:
    assert load_config(CONFIGS / "default.yaml") == Config()


def test_demo_yaml_is_what_the_demo_trains_with() -> None:
    from_file = config_to_dict(load_config(CONFIGS / "demo.yaml"))
    built = config_to_dict(demo_config("segmenter_demo/data/Dataset900_Phantom", 5.0))
    from_file["train"]["max_minutes"] = built["train"]["max_minutes"]
    assert from_file == built
