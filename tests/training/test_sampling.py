from __future__ import annotations

import numpy as np
import pytest
import torch

from segmenter.config import AugmentConfig, DataConfig
from segmenter.preprocessing.case import PreprocessedCase
from segmenter.preprocessing.geometry import CropBox
from segmenter.training.sampling import (
    LesionIndex,
    PatchDataset,
    make_loader,
    patch_foreground_rate,
)

AUG_ON = AugmentConfig(rotate_scale_prob=0.5, noise_prob=0.5)


def make_case(label: np.ndarray, case_id: str = "c", channels: int = 2) -> PreprocessedCase:
    """An in-memory case: image channels are arange ramps (so positions can be read back)."""
    shape = label.shape
    ramp = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    image = np.stack([ramp + 1000.0 * c for c in range(channels)])
    return PreprocessedCase(
        case_id, image, label.astype(np.uint8), CropBox.whole(shape), np.eye(4), (1.0,) * 3, shape
    )


def cube_label(shape=(64, 64, 64), lo=(30, 30, 30), size=2) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[tuple(slice(a, a + size) for a in lo)] = 1
    return label


def two_lesions() -> np.ndarray:
    """48^3: a 10^3 lesion (1000 voxels) and a 1-voxel lesion, both away from the border."""
    label = np.zeros((48, 48, 48), dtype=np.uint8)
    label[9:19, 9:19, 9:19] = 1
    label[36, 35, 37] = 1
    return label


def loader_cases() -> list[PreprocessedCase]:
    rng = np.random.default_rng(0)
    cases = []
    for i, shape in enumerate([(24, 20, 22), (12, 30, 18), (20, 20, 20)]):
        label = (rng.random(shape) > 0.995).astype(np.uint8) if i != 2 else np.zeros(shape)
        case = make_case(label, f"c{i}")
        image = rng.normal(size=case.image.shape).astype(np.float32)
        cases.append(PreprocessedCase(f"c{i}", image, case.label, case.box, case.affine,
                                      case.spacing, case.original_shape))  # fmt: skip
    return cases


def test_lesion_index_groups_voxels_by_component() -> None:
    index = LesionIndex.build(two_lesions())
    assert index.n_lesions == 2
    sizes = sorted(np.diff(index.offsets).tolist())
    assert sizes == [1, 1000]
    assert len(index.voxels) == 1001 and index.voxels.dtype == np.int32
    empty = LesionIndex.build(np.zeros((4, 4, 4)))
    assert empty.n_lesions == 0 and len(empty.voxels) == 0


@pytest.mark.parametrize("fraction", [0.0, 0.33, 1.0])
def test_foreground_oversampling_rate(fraction: float) -> None:
    cases = [make_case(cube_label(lo=(28 + i, 30, 31 - i)), f"c{i}") for i in range(3)]
    ds = PatchDataset(cases, (8, 8, 8), foreground_fraction=fraction)
    n = 2000
    rate = patch_foreground_rate(ds, n, seed=1)
    # a random 8^3 patch holds the 2^3 lesion with p = (9 / 57)^3 ~ 0.004
    expected = fraction + (1 - fraction) * (9 / 57) ** 3
    bound = 4.5 * np.sqrt(max(expected * (1 - expected), 1e-3) / n)
    assert abs(rate - expected) <= bound, (rate, expected)


def test_lesion_mode_balances_small_and_large_lesions() -> None:
    label = two_lesions()
    big = np.zeros_like(label, dtype=bool)
    big[9:19, 9:19, 9:19] = True
    counts = {}
    for mode in ("lesion", "foreground"):
        ds = PatchDataset([make_case(label)], (16, 16, 16), foreground_fraction=1.0, sampling=mode)
        gen = np.random.default_rng(0)
        n_big = n_tiny = 0
        for _ in range(1000):
            loc = ds.sample_location(gen)
            centre = tuple(a + p // 2 for a, p in zip(loc.lo, ds.patch_size, strict=True))
            assert centre == loc.centre  # no border shift for these lesions
            n_big += bool(big[centre])
            n_tiny += centre == (36, 35, 37)
        assert n_big + n_tiny == 1000
        counts[mode] = n_tiny / 1000
    assert abs(counts["lesion"] - 0.5) < 0.07
    assert counts["foreground"] < 0.01


def test_lesion_free_cases_are_sampled_and_fall_back_to_random() -> None:
    cases = [make_case(cube_label((32, 32, 32)), "lesion"), make_case(np.zeros((32,) * 3), "free")]
    ds = PatchDataset(cases, (8, 8, 8), foreground_fraction=1.0)
    gen = np.random.default_rng(0)
    locations = [ds.sample_location(gen) for _ in range(400)]
    free = [loc for loc in locations if loc.case == 1]
    assert 150 < len(free) < 250
    assert not any(loc.foreground for loc in free)
    assert all(loc.foreground for loc in locations if loc.case == 0)
    sample = ds.sample(np.random.default_rng(1))
    assert sample["image"].shape == (2, 8, 8, 8)


def test_patch_reads_the_right_voxels() -> None:
    case = make_case(cube_label((20, 20, 20), lo=(10, 11, 12), size=1))
    ds = PatchDataset([case], (8, 8, 8), foreground_fraction=1.0)
    out = ds.sample(np.random.default_rng(0))
    lo = (6, 7, 8)  # lesion voxel at the centre (patch // 2)
    expected = case.image[:, 6:14, 7:15, 8:16]
    np.testing.assert_array_equal(out["image"].numpy(), expected)
    assert out["label"][0, 4, 4, 4] == 1 and out["label"].sum() == 1
    assert tuple(lo) == ds.sample_location(np.random.default_rng(0)).lo


def test_patch_shapes_and_padding_of_small_volumes() -> None:
    shape = (10, 40, 6)
    label = np.zeros(shape, dtype=np.uint8)
    label[5, 20, 3] = 1
    case = PreprocessedCase("small", np.ones((2, *shape), np.float32), label,
                            CropBox.whole(shape), np.eye(4), (1.0,) * 3, shape)  # fmt: skip
    for fraction in (0.0, 1.0):
        ds = PatchDataset([case], (16, 16, 16), foreground_fraction=fraction)
        gen = np.random.default_rng(0)
        for _ in range(10):
            out = ds.sample(gen)
            assert out["image"].shape == (2, 16, 16, 16) and out["image"].dtype == torch.float32
            assert out["label"].shape == (1, 16, 16, 16) and out["label"].dtype == torch.float32
            assert out["image"][0].sum().item() == 10 * 16 * 6  # the rest is zero padding
            img = out["image"][0]
            assert img[3:13, :, 5:11].all() and not img[:3].any() and not img[13:].any()
    ds = PatchDataset([case], (16, 16, 16), foreground_fraction=1.0, augment=AUG_ON)
    gen = np.random.default_rng(0)
    for _ in range(10):
        out = ds.sample(gen)
        assert out["image"].shape == (2, 16, 16, 16) and out["label"].shape == (1, 16, 16, 16)


def test_foreground_patch_is_shifted_inside_at_the_border() -> None:
    case = make_case(cube_label((32, 32, 32), lo=(0, 31, 15), size=1))
    ds = PatchDataset([case], (8, 8, 8), foreground_fraction=1.0)
    loc = ds.sample_location(np.random.default_rng(0))
    assert loc.centre == (0, 31, 15) and loc.lo == (0, 24, 11)


def batches(loader: torch.utils.data.DataLoader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches(workers: int) -> None:
    cases = loader_cases()
    cfg = DataConfig(patch_size=(16, 16, 16), batch_size=2, num_workers=workers)
    first = batches(make_loader(cases, cfg, AUG_ON, seed=7), 4)
    again = batches(make_loader(cases, cfg, AUG_ON, seed=7), 4)
    other = batches(make_loader(cases, cfg, AUG_ON, seed=8), 4)
    assert same_batches(first, again)
    assert not same_batches(first, other)
    assert not torch.equal(first[0]["image"], first[1]["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_leaves_the_global_torch_rng_alone(workers: int) -> None:
    # Resume makes its loaders at other moments than the run it continues: if they drew from
    # the global RNG, dropout after a resume would differ from the uninterrupted run's.
    cfg = DataConfig(patch_size=(16, 16, 16), batch_size=2, num_workers=workers)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    it = iter(make_loader(loader_cases(), cfg, AUG_ON, seed=7))
    next(it)
    del it
    assert torch.equal(torch.rand(3), expected)


def test_loader_with_two_workers_delivers_batches() -> None:
    cases = loader_cases()
    cfg = DataConfig(patch_size=(16, 16, 16), batch_size=3, num_workers=2, sampling="lesion")
    loader = make_loader(cases, cfg, AugmentConfig(), seed=0)
    assert loader.persistent_workers and not loader.pin_memory
    it = iter(loader)
    for _ in range(6):
        batch = next(it)
        assert batch["image"].shape == (3, 2, 16, 16, 16)
        assert batch["label"].shape == (3, 1, 16, 16, 16)
        assert batch["image"].dtype == batch["label"].dtype == torch.float32
        assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    # a second epoch on the persistent workers continues with fresh draws
    second = next(iter(loader))
    assert second["image"].shape == (3, 2, 16, 16, 16)
    del it


def test_set_epoch_changes_the_stream() -> None:
    ds = PatchDataset(loader_cases(), (8, 8, 8), seed=3)
    first = next(iter(ds))["image"]
    ds2 = PatchDataset(loader_cases(), (8, 8, 8), seed=3)
    assert torch.equal(next(iter(ds2))["image"], first)
    assert not torch.equal(next(iter(ds2))["image"], first)  # second iterator: new stream
    ds3 = PatchDataset(loader_cases(), (8, 8, 8), seed=3)
    ds3.set_epoch(1)
    assert not torch.equal(next(iter(ds3))["image"], first)


def test_rejects_unlabelled_cases_and_bad_arguments() -> None:
    case = make_case(np.zeros((8, 8, 8)))
    unlabelled = PreprocessedCase("u", case.image, None, case.box, case.affine, case.spacing,
                                  case.original_shape)  # fmt: skip
    with pytest.raises(ValueError, match="u: training cases need a label"):
        PatchDataset([unlabelled], (8, 8, 8))
    with pytest.raises(ValueError, match="foreground_fraction"):
        PatchDataset([case], (8, 8, 8), foreground_fraction=1.5)
    with pytest.raises(ValueError, match="sampling"):
        PatchDataset([case], (8, 8, 8), sampling="voxel")  # type: ignore[arg-type]


def test_thick_slice_patches_rotate_in_plane_and_keep_their_slices() -> None:
    label = np.zeros((48, 48, 6), dtype=np.uint8)
    label[20:28, 20:28, 2:4] = 1
    case = make_case(label, channels=1)
    bright = np.zeros((48, 48, 6), np.float32)
    bright[:, :, 3] = 1e6  # one slice far brighter than the ramp: where does it go?
    case = PreprocessedCase(
        "thick", case.image + bright, case.label, case.box, case.affine, (0.5, 0.5, 7.0),
        case.original_shape,
    )  # fmt: skip
    aug = AugmentConfig(rotate_scale_prob=1.0, flip_prob=0.0, brightness_prob=0.0,
                        contrast_prob=0.0, gamma_prob=0.0, noise_prob=0.0)  # fmt: skip
    ds = PatchDataset([case], (40, 40, 6), augment=aug, foreground_fraction=1.0)
    assert ds.thick_axis == 2
    gen = np.random.default_rng(1)
    for _ in range(10):
        img = ds.sample(gen)["image"][0]
        inside = img[8:32, 8:32]  # away from the rotated patch's padded corners
        assert bool((inside[:, :, 3] > 5e5).all()) and bool((inside[:, :, [2, 4]] < 5e5).all())
    iso = PatchDataset([make_case(cube_label())], (32, 32, 32), augment=aug)
    assert iso.thick_axis is None
