"""Tests for segmenter.planning.memory: the documented estimate on hand-made headers, a refusal
that names the file and the figures (exit 2, nothing written) for ``predict`` and ``train``, a
header claiming a huge volume refused before a voxel is read, and the estimate against the
measured peak of a real prediction."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmenter import io, resources
from segmenter.cli import main
from segmenter.config import Config, DataConfig
from segmenter.data.layout import Case, load_dataset
from segmenter.data.synthetic import PhantomSpec, write_dataset
from segmenter.errors import InputError
from segmenter.planning.memory import (
    InferenceSetting,
    TrainingJob,
    Volume,
    check_prediction,
    check_training,
    prediction_estimate,
    training_estimate,
)

N = 100**3


def info(name: str = "scan_0000.nii.gz", shape: tuple[int, ...] = (100, 100, 100),
         dtype: type = np.float32, spacing: float = 1.0) -> io.ImageInfo:  # fmt: skip
    return io.ImageInfo(Path(name), shape, np.diag([spacing] * 3 + [1.0]), (spacing,) * 3,
                        np.dtype(dtype))  # fmt: skip


def setting(**changes: object) -> InferenceSetting:
    base = InferenceSetting(target_spacing=None, patch_size=(32, 32, 32), out_channels=1,
                            sw_batch_size=2, tta=True, base_filters=4)  # fmt: skip
    return replace(base, **changes)


def two_channels(**kw: object) -> Volume:
    return Volume.from_headers([info("scan_0000.nii.gz", **kw), info("scan_0001.nii.gz", **kw)])


def huge_nifti(path: Path, shape: tuple[int, ...], dtype: type = np.float32) -> Path:
    """A .nii.gz whose header claims ``shape`` over a payload of 64 bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))
    return path


def fake_available(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(resources, "available_memory", lambda *args, **kwargs: n)


# ------------------------------------------------------------------------------------------
# the estimate, on hand-made headers


def test_the_window_phase_of_a_float32_scan_is_the_documented_sum() -> None:
    est = prediction_estimate(two_channels(), [setting()])
    # ch + dec 12N, image 8N, tensor 8N, accumulators 12N, windows: importance map 4P, windows
    # in and out with the mirrors' sum 4(C+3K)WP, 2 x 32^3 x (24 + 34 x 4) activations and 32 MB
    p = 32**3
    assert est.phases["window"] == 40 * N + 4 * p + 40 * p + 2 * p * 160 + 32_000_000
    assert est.phase == "window" and est.live == est.phases["window"]
    assert est.total == int(est.live * 1.1) + 64_000_000 + 64_000_000


def test_resampling_counts_the_voxels_at_the_runs_target_spacing() -> None:
    vol = two_channels()
    assert vol.resampled_voxels((2.0, 2.0, 2.0)) == N // 8
    assert vol.resampled_voxels((0.5, 1.0, 1.0)) == 2 * N
    coarse = prediction_estimate(vol, [setting(target_spacing=(2.0, 2.0, 2.0))]).live
    fine = prediction_estimate(vol, [setting(target_spacing=(0.5, 0.5, 0.5))]).live
    own = prediction_estimate(vol, [setting()]).live
    assert coarse < own < fine


def test_an_ensemble_holds_the_running_sum_of_probabilities_in_every_phase() -> None:
    one = prediction_estimate(two_channels(), [setting()]).phases
    two = prediction_estimate(two_channels(), [setting(), setting()]).phases
    assert {k: two[k] - one[k] for k in one} == {k: 4 * N for k in one}


def test_on_a_gpu_the_host_keeps_only_the_image_and_its_copy() -> None:
    est = prediction_estimate(two_channels(), [setting(on_accelerator=True)])
    assert est.phases["window"] == 12 * N + 8 * N + 8 * N


def test_integer_files_pay_for_the_float64_scaling_and_itk_files_for_three_copies() -> None:
    assert two_channels(dtype=np.int16).decode_bytes == N * (2 + 8)
    assert two_channels(dtype=np.float32).decode_bytes == N * 4
    mha = Volume.from_headers([info("scan.mha"), info("scan_0001.nii.gz", dtype=np.uint8)])
    assert mha.decode_bytes == 12 * N


def test_the_file_claiming_the_most_voxels_is_the_one_named() -> None:
    vol = Volume.from_headers([info(), info("big_0001.nii.gz", shape=(100, 100, 100, 40))])
    assert vol.path == Path("big_0001.nii.gz") and vol.voxels == N
    assert vol.describe() == "100x100x100x40 voxels, 2 channels"
    assert vol.channel_bytes == 4 * N * 41


def tiny_job(cfg: Config, **changes: object) -> TrainingJob:
    return replace(TrainingJob(cfg=cfg, fold=0, parameters=10_000, out_channels=1), **changes)


def test_a_cache_dir_takes_the_dataset_out_of_memory() -> None:
    vols = [Volume.from_headers([info(), info()], info("label.nii.gz", dtype=np.uint8))] * 4
    held = training_estimate(vols, tiny_job(Config())).phases
    mapped = training_estimate(vols, tiny_job(Config(data=DataConfig(cache_dir="c")))).phases
    assert held["train"] - mapped["train"] == 4 * (4 * 2 + 1) * N
    cached = tiny_job(Config(data=DataConfig(cache_dir="c")), cached=(True,) * 4)
    assert training_estimate(vols, cached).phases["preprocess"] == 0  # nothing left to read


def test_validated_cases_follow_train_validation() -> None:
    big = (200, 200, 200)
    label = info("label.nii.gz", shape=big, dtype=np.uint8)
    vols = [Volume.from_headers([info(shape=big), info(shape=big)], label)] * 5
    cfg = Config(data=DataConfig(patch_size=(16, 16, 16), batch_size=1))  # validation peaks
    on_training = replace(cfg, train=replace(cfg.train, validation="training"))
    one_fold = training_estimate(vols, tiny_job(cfg)).phases["train"]  # 1 of 5 held out
    every = training_estimate(vols, tiny_job(on_training, fold="all")).phases["train"]
    assert every - one_fold == 2 * 4 * 200**3 * (5 - 1)  # the kept and the new probabilities
    fold_training = training_estimate(vols, tiny_job(on_training)).phases["train"]
    assert fold_training - one_fold == 2 * 4 * 200**3 * (4 - 1)  # the 4 training cases
    # --fold all validates nothing by default: no probabilities kept, no validation windows
    none = training_estimate(vols, tiny_job(cfg, fold="all")).phases["train"]
    assert none < one_fold


# ------------------------------------------------------------------------------------------
# refusals


def test_an_unknown_available_figure_checks_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(resources, "available_memory", lambda *args, **kwargs: None)
    scan = huge_nifti(tmp_path / "scan_0000.nii.gz", (16, 16, 16))  # a payload gzip can hold
    check_prediction([Case("scan", (scan,))], [setting()])


def test_a_folders_case_counts_the_next_case_read_meanwhile(tmp_path: Path) -> None:
    # headers over payloads gzip can hold (no voxel is read)
    big = Case("big", (huge_nifti(tmp_path / "big_0000.nii.gz", (24, 24, 24)),))
    small = Case("small", (huge_nifti(tmp_path / "small_0000.nii.gz", (16, 16, 16)),))
    alone = prediction_estimate(Volume.from_headers([io.read_info(big.images[0])]), [setting()])
    ahead = Volume.from_headers([io.read_info(small.images[0])]).held_bytes
    check_prediction([small, big], [setting()], available=alone.total)  # big: nothing after it
    with pytest.raises(InputError, match=r"big_0000\.nii\.gz: needs about .* to predict"):
        check_prediction([big, small], [setting()], available=alone.total + ahead - 1)
    check_prediction([big, small], [setting()], available=alone.total + ahead)


def test_a_prediction_that_does_not_fit_is_refused_in_one_line_and_nothing_is_written(
    trained_run: Path, phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fake_available(monkeypatch, 50_000_000)
    out = tmp_path / "masks"
    argv = ["predict", "--model", str(trained_run), "--input", str(phantoms / "imagesTs"),
            "--output", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "phantom_test_000_0000.nii.gz: needs about " in line
    assert line.endswith(
        " MB to predict (32x32x32 voxels, 2 channels), 50.0 MB available; crop or resample "
        "the scan, or use a machine with more memory"
    )
    assert not out.exists()


def test_training_that_does_not_fit_is_refused_in_one_line_and_no_run_folder_is_made(
    phantoms: Path, tiny_config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fake_available(monkeypatch, 50_000_000)
    run = tmp_path / "run"
    assert main(["train", "--config", str(tiny_config_file), "--out", str(run)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"error: {phantoms}: needs about " in line
    assert line.endswith(
        " MB to train (6 cases, the largest 32x32x32 voxels; patch 32x32x32, batch 2), 50.0 MB "
        "available; set data.cache_dir (cases memory-mapped, not held), lower data.patch_size "
        "or data.batch_size, or use a machine with more memory"
    )
    assert not run.exists()


def test_a_header_claiming_3000_cubed_voxels_is_refused_before_a_voxel_is_read(
    trained_run: Path, phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    reads: list[object] = []
    real_read = io.read_image
    monkeypatch.setattr(io, "read_image", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    fake_available(monkeypatch, 16 * 10**9)
    huge = huge_nifti(tmp_path / "scan_0000.nii.gz", (3000, 3000, 3000))
    t1 = shutil.copy(phantoms / "imagesTs" / "phantom_test_000_0001.nii.gz", tmp_path)
    out = tmp_path / "mask.nii.gz"
    argv = ["predict", "--model", str(trained_run), "--input", str(huge), str(t1),
            "--output", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    # io's header check refuses it first (its payload cannot fit the file), before any voxel
    assert "scan_0000.nii.gz: header claims 3000x3000x3000 voxels" in line
    assert reads == [] and not out.exists()


def test_a_huge_label_header_is_named_when_training_and_nothing_is_read(
    phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[object] = []
    real_read = io.read_image
    monkeypatch.setattr(io, "read_image", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    data = Path(shutil.copytree(phantoms, tmp_path / phantoms.name))
    label = huge_nifti(data / "labelsTr" / "phantom_003.nii.gz", (3000, 3000, 3000), np.uint8)
    cfg = Config(data=DataConfig(dataset=str(data), patch_size=(32, 32, 32)))
    job = tiny_job(cfg)
    # io's header check refuses it first (its payload cannot fit the file), before any voxel
    with pytest.raises(InputError, match=r"phantom_003\.nii\.gz: header claims 3000x3000x3000"):
        check_training(load_dataset(data), job, available=16 * 10**9)
    assert reads == [] and label.stat().st_size < 1000


# ------------------------------------------------------------------------------------------
# against a measured peak

#: Runs ``segmenter predict`` in a fresh interpreter and reports, as JSON on its last line,
#: the estimate its memory check computed and the resident set's growth from that check on
#: (the peak read as VmHWM after resetting it through /proc/self/clear_refs).
MEASURE = textwrap.dedent("""
    import json, sys
    from segmenter import cli
    from segmenter.inference import predict
    from segmenter.planning import memory

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    seen = {}
    def measured(cases, runs, **kwargs):
        memory.check_prediction(cases, runs, **kwargs)
        seen["estimate"] = max(
            memory.prediction_estimate(memory.case_volume(c), runs).total for c in cases
        )
        seen["start"] = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    predict.check_prediction = measured
    code = cli.main(sys.argv[1:])
    print(json.dumps({"code": code, "growth": status("VmHWM") - seen["start"], **seen}))
""")


def can_reset_the_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not can_reset_the_peak(), reason="needs Linux's /proc/self/clear_refs")
def test_the_estimate_bounds_a_64_cubed_predictions_peak_within_3x(
    trained_run: Path, tmp_path: Path
) -> None:
    data = write_dataset(tmp_path, 1, seed=1, spec=PhantomSpec(size=64))
    scans = [str(p) for p in sorted((data / "imagesTr").glob("*.nii.gz"))]
    argv = ["predict", "--model", str(trained_run), "--input", *scans,
            "--output", str(tmp_path / "mask.nii.gz"), "--device", "cpu", "--no-tta"]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert result["growth"] <= result["estimate"] <= 3 * result["growth"], result
