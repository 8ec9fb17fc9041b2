"""Tests for segmenter.planning.planner and `segmenter plan`: spacing, patch, depth, normalisation,
files."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmenter.cli import main
from segmenter.config import PlanConfig, load_config
from segmenter.data.layout import load_dataset
from segmenter.data.synthetic import PhantomSpec, write_dataset
from segmenter.errors import InputError
from segmenter.planning.fingerprint import dataset_fingerprint
from segmenter.planning.planner import (
    choose_width,
    make_dataset_plan,
    normalisation,
    patch_and_depth,
    read_dataset_plan,
    spacing_for_lesions,
    steps_in_budget,
)
from segmenter.planning.run_plan import RunPlan
from segmenter.preprocessing.case import preprocess_case
from segmenter.preprocessing.spec import PreprocessingSpec

#: The tiny config's changes for the plan-following runs: one step, no mirroring.
ONE_STEP = {"train.iterations_per_epoch": 1, "inference.tta": False}


def test_patch_fits_the_budget_and_the_network_divisor() -> None:
    patch, depth = patch_and_depth((140, 170, 140), (1.0, 1.0, 1.0), 80**3, 6)
    assert math.prod(patch) <= 80**3
    assert depth == 5  # 80-ish voxels: halved 4 times keeps >= 4
    assert all(p % 16 == 0 for p in patch)
    assert max(patch) / min(patch) < 1.5  # shrinks the longest extent first: near-cubic


def test_a_small_median_shape_is_kept_whole() -> None:
    patch, depth = patch_and_depth((40, 48, 36), (1.0, 1.0, 1.0), 128**3, 6)
    assert patch == (40, 48, 32) and depth == 4  # rounded down to multiples of 8


def test_anisotropic_data_keep_the_thick_axis_short() -> None:
    patch, depth = patch_and_depth((320, 320, 24), (0.7, 0.7, 4.0), 80**3, 6)
    assert math.prod(patch) <= 80**3
    assert patch[2] <= 24 and min(patch[:2]) > 3 * patch[2] and abs(patch[0] - patch[1]) <= 32


#: Whole tumours (15-230 ml) and a few satellites, like BraTS's whole-tumour labels.
TUMOURS = [240.0, 400.0, 700.0] + [15000.0 + 10000.0 * i for i in range(22)]
#: MS-like lesions: most of a few to tens of mm3.
MS_LESIONS = [2.0, 3.0, 4.0, 6.0, 10.0, 15.0, 21.0, 40.0, 90.0, 300.0, 900.0] * 5


def test_large_lesions_coarsen_the_fine_axes_until_one_patch_holds_the_scan() -> None:
    plan = PlanConfig()
    spacing, why = spacing_for_lesions((1.0, 1.0, 1.0), (140, 170, 140), TUMOURS, 80**3, plan)
    # the median brain (140 x 170 x 140 mm) in 80^3 voxels: 1.87 mm, under the lesions' limit
    assert spacing == pytest.approx((1.867,) * 3, abs=1e-3)
    assert (
        why["coverage_limit_mm"] < why["lesion_limit_mm"] and "holds the median scan" in why["why"]
    )
    bigger = spacing_for_lesions((1.0, 1.0, 1.0), (200, 240, 200), TUMOURS, 80**3, plan)[0]
    assert bigger == (2.0, 2.0, 2.0)  # a larger field of view stops at plan.max_spacing_mm
    off = replace(plan, max_spacing_mm=None)
    kept, why = spacing_for_lesions((1.0, 1.0, 1.0), (140, 170, 140), TUMOURS, 80**3, off)
    assert kept == (1.0, 1.0, 1.0) and why["why"] == "kept: plan.max_spacing_mm is null"


def test_small_lesions_keep_the_spacing_and_a_thick_axis_is_never_coarsened() -> None:
    plan = PlanConfig()
    spacing, why = spacing_for_lesions((1.0, 1.0, 1.0), (140, 175, 145), MS_LESIONS, 64**3, plan)
    assert spacing == (1.0, 1.0, 1.0) and why["why"].startswith("kept: the small lesions")
    # thick slices: a lesion thinner than a slice spreads in-plane (a disc one slice high)
    thick = (0.5, 0.5, 7.5)
    spacing, why = spacing_for_lesions(thick, (400, 450, 20), MS_LESIONS, 80**3, plan)
    assert spacing == thick
    assert why["small_lesion_extent_mm"] == pytest.approx(math.sqrt(4 * 3.0 / (math.pi * 7.5)))
    # large lesions on thick slices: only the in-plane axes coarsen
    spacing, _ = spacing_for_lesions(thick, (400, 450, 20), TUMOURS, 80**3, plan)
    assert spacing[2] == 7.5 and spacing[0] == spacing[1] > 1.0


def test_the_plan_sizes_the_spacing_by_the_lesions_the_preset_counts() -> None:
    # every case: one 60 ml tumour and forty 2-voxel specks (whole-tumour labels carry them)
    case = {
        "spacing": [1.0, 1.0, 1.0], "shape": [240, 240, 155], "cropped_shape": [140, 170, 140],
        "lesion_volumes_mm3": [60000.0] + [2.0] * 40,
    }  # fmt: skip
    fp = {
        "dataset": "d", "channel_names": ["FLAIR"], "file_ending": ".nii.gz",
        "cases": [case] * 4, "summary": {"channels": [{}]},
    }  # fmt: skip
    brats = make_dataset_plan(fp, load_config(None, ["evaluation.preset=brats23"]))
    assert brats["target_spacing"][0] > 1.5  # the specks (under brats23's 50 mm3) do not count
    assert brats["spacing_choice"]["lesions_counted_above_mm3"] == 50.0
    assert brats["median_resampled_shape"][0] == pytest.approx(
        140 / brats["target_spacing"][0], abs=1
    )
    isles = make_dataset_plan(fp, load_config(None, ["evaluation.preset=isles22"]))
    assert isles["target_spacing"] == [1.0, 1.0, 1.0]  # under isles22 every speck is a lesion


def test_ct_channels_are_clipped_and_mri_channels_z_scored() -> None:
    stats = {
        "median_percentiles": {"0.5": -1000.0, "99.5": 1500.0},
        "median_mean": 40.0, "median_std": 300.0,
    }  # fmt: skip
    schemes = normalisation(["CT", "FLAIR"], {"channels": [stats, stats]})
    assert schemes[0] == {
        "channel": "CT", "scheme": "ct_clip_zscore", "clip": [-1000.0, 1500.0],
        "mean": 40.0, "std": 300.0,
    }  # fmt: skip
    assert schemes[1] == {"channel": "FLAIR", "scheme": "zscore_nonzero"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = PhantomSpec(size=48, spacing=(1.0, 1.0, 1.5))
    return write_dataset(tmp_path_factory.mktemp("plan"), 3, seed=2, spec=spec)


def test_make_plan_from_a_fingerprint(dataset: Path) -> None:
    fp = dataset_fingerprint(load_dataset(dataset))
    cpu = make_dataset_plan(fp, load_config(None, []))
    assert cpu["target_spacing"] == pytest.approx([1.0, 1.0, 1.5])
    assert cpu["budget"] == "cpu" and cpu["batch_size"] == 2 and not cpu["anisotropic"]
    assert len(cpu["strides"]) == cpu["depth"] == len(cpu["kernels"])
    assert [n["scheme"] for n in cpu["normalization"]] == ["zscore_nonzero"] * 2
    small = make_dataset_plan(fp, load_config(None, ["plan.cpu_patch_voxels=4096"]))
    assert math.prod(small["patch_size"]) <= 4096
    assert math.prod(small["patch_size"]) < math.prod(cpu["patch_size"])


def test_plan_command_writes_fingerprint_and_plan(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p"
    assert main(["plan", str(dataset), "--out", str(out), "--set", "plan.budget=gpu"]) == 0
    printed = capsys.readouterr().out
    assert "target spacing" in printed and "gpu budget" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget"] == "gpu"
    assert json.loads((out / "fingerprint.json").read_text())["summary"]["n_cases"] == 3
    assert main(["plan", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_train_follows_a_plan_and_set_still_wins(
    dataset: Path, tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "p"
    assert (
        main(["plan", str(dataset), "--out", str(out), "--set", "plan.cpu_patch_voxels=32768"]) == 0
    )
    plan = json.loads((out / "plan.json").read_text())
    config = tiny_config(tmp_path / "c.yaml", dataset, ONE_STEP)
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--plan", str(out / "plan.json"),
            "--set", "data.batch_size=1", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    saved = load_config(run / "config.yaml")
    assert list(saved.data.patch_size) == plan["patch_size"]
    assert saved.model.depth == plan["depth"]
    assert list(saved.data.target_spacing or ()) == plan["target_spacing"]
    assert saved.data.batch_size == 1  # --set comes after the plan


def _ct_dataset(root: Path) -> Path:
    """Phantoms whose channel 0 is called CT and holds Hounsfield-like values (air -1000)."""
    spec = PhantomSpec(size=32, lesion_free_fraction=0.0)
    ds = write_dataset(root, 3, seed=5, spec=spec, n_test=1)
    meta = json.loads((ds / "dataset.json").read_text())
    meta["channel_names"]["0"] = "CT"
    (ds / "dataset.json").write_text(json.dumps(meta))
    for path in [*ds.glob("imagesTr/*_0000.nii.gz"), *ds.glob("imagesTs/*_0000.nii.gz")]:
        img = nib.load(path)
        hu = np.asarray(img.dataobj, dtype=np.float32) * 1000.0 - 1000.0
        nib.save(nib.Nifti1Image(hu, img.affine), path)
    return ds


def test_a_ct_dataset_is_planned_trained_and_predicted_with_dataset_statistics(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    ds = _ct_dataset(tmp_path / "ct")
    out = tmp_path / "p"
    assert main(["plan", str(ds), "--out", str(out), "--set", "plan.cpu_patch_voxels=16384"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    ct, mri = plan["normalization"]
    assert ct["scheme"] == "ct_clip_zscore" and ct["clip"][0] < ct["clip"][1] and ct["std"] > 0
    assert mri["scheme"] == "zscore_nonzero"
    changes = {**ONE_STEP, "data.cache_dir": tmp_path / "cache"}
    config = tiny_config(tmp_path / "c.yaml", ds, changes)
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--plan", str(out / "plan.json"), "--out", str(run)]
    assert main(argv) == 0
    run_plan = json.loads((run / "plan.json").read_text())
    assert run_plan["normalization"][0] == {**ct, "channel": "CT"}
    schemes = RunPlan.from_json(run_plan).preprocessing.normalization
    assert load_config(run / "config.yaml").data.normalization == schemes

    # Channel 0 is the same affine map of HU in every case, air included (not zeroed).
    case = load_dataset(ds).training[0]
    pre = preprocess_case(case, PreprocessingSpec(crop_to_nonzero=False, normalization=schemes))
    raw = np.asarray(nib.load(case.images[0]).dataobj, dtype=np.float32)
    lo, hi = ct["clip"]
    expected = (np.clip(raw, lo, hi) - ct["mean"]) / ct["std"]
    np.testing.assert_allclose(pre.image[0], expected, rtol=1e-5, atol=1e-5)
    argv = ["predict", "--model", str(run), "--input", str(ds / "imagesTs"),
            "--output", str(tmp_path / "pred"), "--no-tta"]  # fmt: skip
    assert main(argv) == 0
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == len(list(ds.glob("imagesTs/*_0000*")))


def test_a_bad_plan_file_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("{}")
    with pytest.raises(InputError, match="not a plan.json"):
        read_dataset_plan(path)


def _plan_section(**values: object) -> PlanConfig:
    return replace(load_config(None, []).plan, **values)


def test_choose_width_keeps_the_widest_that_trains_enough_steps() -> None:
    plan = _plan_section(minutes=15.0, min_steps=1000, overhead=0.1)
    # 15 min x 0.9 = 810 s: 8 filters 0.57 s -> 1421 steps, 16 filters 1.57 s -> 515 steps
    assert steps_in_budget(0.57, 15.0, 0.1) == 1421
    choice = choose_width([(16, 1.57), (8, 0.57)], plan)
    assert choice["base_filters"] == 8
    assert [c["base_filters"] for c in choice["candidates"]] == [8, 16]
    assert [c["steps_in_budget"] for c in choice["candidates"]] == [1421, 515]
    assert "widest network that trains at least 1000 steps in 15 min" in choice["why"]
    fast = choose_width([(8, 0.1), (16, 0.2), (32, 0.5)], plan)  # a GPU-like machine
    assert fast["base_filters"] == 32


def test_choose_width_falls_back_to_the_narrowest_when_none_reaches_the_steps() -> None:
    choice = choose_width([(16, 3.1), (8, 1.2)], _plan_section(minutes=5.0, min_steps=1000))
    assert choice["base_filters"] == 8
    assert choice["why"].startswith("no width trains 1000 steps in 5 min here")
    with pytest.raises(ValueError, match="plan.minutes"):
        choose_width([(8, 1.0)], _plan_section(minutes=None))
    with pytest.raises(ValueError, match="at least one timing"):
        choose_width([], _plan_section(minutes=5.0))


def test_plan_for_a_budget_times_the_widths_here_and_train_takes_the_width(
    dataset: Path,
    tiny_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "p"
    argv = ["plan", str(dataset), "--out", str(out), "--minutes", "30",
            "--set", "plan.cpu_patch_voxels=32768", "--set", "plan.widths=[2, 4, 8]",
            "--set", "plan.min_steps=200", "--set", "train.threads=2",
            "--set", "train.precision=fp32"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    choice = plan["width_choice"]
    timed = [c["base_filters"] for c in choice["candidates"]]
    assert timed[:2] == [2, 4] and all(c["seconds_per_step"] > 0 for c in choice["candidates"])
    assert choice["minutes"] == 30.0 and choice["min_steps"] == 200
    assert plan["base_filters"] in timed
    enough = [c for c in choice["candidates"] if c["steps_in_budget"] >= 200]
    expected = enough[-1] if enough else choice["candidates"][0]
    assert plan["base_filters"] == expected["base_filters"]
    assert f"base filters {plan['base_filters']}:" in printed
    assert "2 base filters:" in printed and "s per step" in printed
    config = tiny_config(tmp_path / "c.yaml", dataset, ONE_STEP)
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--plan", str(out / "plan.json"), "--out", str(run)]
    assert main(argv) == 0
    trained = load_config(run / "config.yaml").model
    assert trained.base_filters == plan["base_filters"]
    assert trained.max_filters == plan["max_filters"]
    assert plan["max_filters"] == 256  # the planning config's cap (the default's)


def test_width_timing_stops_at_the_first_width_too_slow_for_the_budget(
    tiny_config_file: Path,
) -> None:
    from segmenter.training.speed import measure_step, time_widths

    cfg = load_config(tiny_config_file, ["plan.minutes=0.001", "plan.widths=[4, 8]"])
    rng = torch.get_rng_state()
    timings = time_widths(cfg, 2)
    assert [t.base_filters for t in timings] == [4]  # 0.06 s of budget: 4 already too slow
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is untouched
    one = measure_step(cfg, 2, steps=2, warmup=0)
    assert one.timed_steps == 2 and one.seconds_per_step > 0


def test_train_plans_by_itself_from_a_config_naming_the_dataset_and_the_budget(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "minimal.yaml"
    # the dataset and the budget; the rest only keeps the test short (one step, one width)
    config.write_text(
        f"data: {{dataset: {dataset}, num_workers: 0}}\n"
        "train: {max_minutes: 5, epochs: 1, iterations_per_epoch: 1, n_folds: 3, precision: fp32}\n"
        "plan: {widths: [4], min_steps: 1}\ninference: {tta: false}\n"
    )
    argv = ["train", "--config", str(config), "--plan", "auto", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "target spacing" in printed and "4 base filters:" in printed  # timed for 5 min
    plan = json.loads((tmp_path / "plans" / dataset.name / "plan.json").read_text())
    assert plan["width_choice"]["minutes"] == 5
    saved = load_config(tmp_path / "a" / "config.yaml")
    assert list(saved.data.patch_size) == plan["patch_size"] and saved.model.base_filters == 4
    assert list(saved.data.target_spacing or ()) == plan["target_spacing"]
    argv = ["train", "--config", str(config), "--plan", "auto", "--out", str(tmp_path / "b"),
            "--set", "data.batch_size=1"]  # fmt: skip
    assert main(argv) == 0
    assert "fingerprint of 3 cases reused" in capsys.readouterr().out
    assert load_config(tmp_path / "b" / "config.yaml").data.batch_size == 1  # --set still wins


def test_plan_auto_is_refused_under_torchrun(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    config = tmp_path / "minimal.yaml"
    config.write_text(f"data: {{dataset: {dataset}}}\ntrain: {{max_minutes: 5}}\n")
    assert main(["train", "--config", str(config), "--plan", "auto", "--out", "run"]) == 2
    assert "--plan auto is not for a torchrun run" in capsys.readouterr().err
    assert not (tmp_path / "plans").exists() and not (tmp_path / "run").exists()
