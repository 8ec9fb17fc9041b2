"""Tests for segmenter.planning.topology: strides, kernels, filters and convolutions per level."""

from __future__ import annotations

import numpy as np

from segmenter.config import ModelConfig
from segmenter.planning.topology import plan_topology, required_divisor


def small(depth: int, **changes: object) -> ModelConfig:
    """A network config with 4 to 16 filters."""
    return ModelConfig(depth=depth, base_filters=4, max_filters=16, **changes)  # type: ignore[arg-type]


def test_required_divisor_is_product_of_strides() -> None:
    assert required_divisor(ModelConfig()) == (8, 8, 8)
    assert required_divisor(small(2)) == (2, 2, 2)
    assert required_divisor(small(6)) == (32, 32, 32)
    topo = plan_topology(ModelConfig())
    assert topo.strides == ((1, 1, 1),) + ((2, 2, 2),) * 3
    assert topo.kernels == ((3, 3, 3),) * 4
    assert topo.filters == (8, 16, 32, 64)
    assert plan_topology(small(5)).filters == (4, 8, 16, 16, 16)  # capped at max_filters


def test_convs_per_level_repeat_the_last_entry() -> None:
    topo = plan_topology(ModelConfig())
    assert topo.encoder_convs == (1, 2, 2, 2) and topo.decoder_convs == (1, 1, 1)
    topo = plan_topology(small(5, encoder_convs=(1, 2, 3), decoder_convs=(2, 1)))
    assert topo.encoder_convs == (1, 2, 3, 3, 3) and topo.decoder_convs == (2, 1, 1, 1)


def test_anisotropic_spacing_sets_per_axis_strides_and_kernels() -> None:
    # Z is 6x coarser: held (stride 1, kernel 1) until X/Y catch up (0.5 -> 1 -> 2 -> 4 mm).
    topo = plan_topology(ModelConfig(), spacing=(0.5, 0.5, 3.0))
    assert topo.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2))
    assert topo.kernels == ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3))
    assert required_divisor(ModelConfig(), spacing=(0.5, 0.5, 3.0)) == (8, 8, 2)
    # Isotropic spacing is the same as no spacing; the rule follows the axis order.
    assert plan_topology(ModelConfig(), spacing=(1.2, 1.2, 1.2)) == plan_topology(ModelConfig())
    assert plan_topology(ModelConfig(), spacing=(4.0, 1.0, 1.0)).strides[1] == (1, 2, 2)
    assert plan_topology(ModelConfig(), spacing=np.array([0.5, 0.5, 3.0])) == topo
    # A short patch axis stops halving at the minimum feature-map size (4 voxels).
    topo = plan_topology(ModelConfig(depth=5), spacing=(1.0, 1.0, 1.0), patch_size=(64, 64, 16))
    assert topo.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1))
    assert topo.divisor == (16, 16, 4)
