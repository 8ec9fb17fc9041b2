"""The bad-input matrix (issue 14, item 2): broken scans, labels, configs and checkpoints, the
command each is given to, and what segmenter must do about it.

Every case copies what it needs from a :class:`World` (the shared phantom dataset and a tiny
trained run) into its own folder, breaks one thing there and names the command line to run.
:func:`judge` says whether the command did what the case decided: refuse with exit code 2 and
one ``error:`` line naming the file and the problem (``verify`` prints its report lines on
stdout instead), no traceback, nothing written, no code run from a file; or accept with exit
code 0 and a warning. ``tests/test_bad_inputs.py`` runs each case as a test;
:func:`bad_input_rows` runs them all outside pytest (for ``scripts/fault_matrix.py``).

Decisions worth stating: a 4D scan whose fourth axis has length 1 is read as 3D (converters
write them); ``scl_slope`` NaN or 0 means no scaling (the NIfTI rule nibabel writes by default);
a scan whose channels are all constant (all zero) is accepted with a warning and gets an empty
mask; everything else here is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import io as text_io
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from segmenter.io import read_image

#: What a case's command may print before its error line (progress bars, log lines) is free;
#: this marks the line that counts.
ERROR_PREFIX = "error: "


@dataclass(frozen=True)
class World:
    """What every case starts from.

    Attributes:
        dataset: the phantom dataset (read only: cases copy it before breaking anything).
        run: a trained run folder (read only).
        tmp: this case's own empty folder.
    """

    dataset: Path
    run: Path
    tmp: Path


@dataclass(frozen=True)
class Call:
    """A command line with the bad input in place.

    Attributes:
        argv: arguments of ``segmenter.cli.main``.
        names: the file the message must name.
        output: where the command would write; after a refusal it must not exist.
        marker: a file that code hidden in the input would create (it must never run).
    """

    argv: list[str]
    names: Path
    output: Path | None = None
    marker: Path | None = None


@dataclass(frozen=True)
class BadInput:
    """One entry of the matrix.

    Attributes:
        fault: what is broken (the test id).
        command: the sub-command it is given to.
        make: writes the bad input into a world and returns the call.
        problem: regex the message (or, when accepted, the warning) must match.
        accepted: the decision is to accept (exit 0, a warning) rather than refuse.
        check_output: for an accepted case, a test of its output (None: it exists).
    """

    fault: str
    command: str
    make: Callable[[World], Call]
    problem: str
    accepted: bool = False
    check_output: Callable[[Path], bool] | None = None

    @property
    def id(self) -> str:
        """``command-fault``, the pytest id."""
        return f"{self.command}-{self.fault}"


@dataclass(frozen=True)
class Outcome:
    """What a call did: exit code, what it printed, and the files before and after."""

    code: int
    stdout: str
    stderr: str
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]


# ------------------------------------------------------------------------------ breakers
# Each breaker damages one file in place.


class WritesAMarker:
    """Unpickling this runs code: it creates ``marker`` (a checkpoint must never do that)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def patch_header(path: Path, **fields: Any) -> None:
    """Set raw header fields of a ``.nii.gz`` (or ``.nii``) without nibabel's checks, e.g.
    ``pixdim=[1, 0, 1, 1, ...]`` or ``pixdim__2=-1`` (one element)."""
    compressed = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    nifti2 = int.from_bytes(data[:4], "little") == 540
    dtype = nib.nifti2.header_dtype if nifti2 else nib.nifti1.header_dtype
    header = np.ndarray((), dtype=dtype, buffer=data)
    for key, value in fields.items():
        name, _, index = key.partition("__")
        if index:
            header[name][int(index)] = value
        else:
            header[name] = value
    path.write_bytes(gzip.compress(bytes(data), mtime=0) if compressed else bytes(data))


def header(**fields: Any) -> Callable[[Path], None]:
    """A breaker setting raw header fields (see :func:`patch_header`)."""
    return lambda path: patch_header(path, **fields)


def arrays(change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> Any:
    """A breaker rewriting the voxels and affine with ``change`` (nibabel writes them as given)."""

    def breaker(path: Path) -> None:
        img = nib.load(path)
        array, affine = change(np.asanyarray(img.dataobj).copy(), img.affine.copy())
        nib.save(nib.Nifti1Image(array, affine), path)

    return breaker


def voxel(value: float, dtype: type = np.float32) -> Callable[[Path], None]:
    """A breaker setting one voxel to ``value`` (in ``dtype``)."""

    def change(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = array.astype(dtype)
        out[16, 16, 16] = value
        return out, affine

    return arrays(change)


def shifted(mm: float) -> Callable[[Path], None]:
    """A breaker moving the grid by ``mm`` along x (same shape, another affine)."""

    def change(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        affine[0, 3] += mm
        return array, affine

    return arrays(change)


def truncated(path: Path) -> None:
    """Keep the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_gzip(path: Path) -> None:
    """The uncompressed NIfTI bytes under the ``.nii.gz`` name."""
    path.write_bytes(gzip.decompress(path.read_bytes()))


def emptied(path: Path) -> None:
    """A file of 0 bytes."""
    path.write_bytes(b"")


def a_folder(path: Path) -> None:
    """A folder where the scan should be."""
    path.unlink()
    path.mkdir()


def huge(nifti2: bool) -> Callable[[Path], None]:
    """A header claiming 40000^3 (NIfTI-2) or 32767^3 (NIfTI-1, its int16 limit) float32 voxels
    over the file's small payload."""

    def breaker(path: Path) -> None:
        img = read_image(path)
        klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        nib.save(klass(img.array.astype(np.float32), img.affine), path)
        n = 40000 if nifti2 else 32767
        patch_header(path, dim=[3, n, n, n, 1, 1, 1, 1])

    return breaker


def as_array(make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """A breaker replacing the voxels with ``make(voxels)`` (any shape or type)."""
    return arrays(lambda array, affine: (make(array), affine))


# ------------------------------------------------------------------------------ placements
# Each placement puts a broken file where one command reads it and returns the call.


def _dataset_copy(world: World) -> Path:
    root = world.tmp / "ds" / world.dataset.name
    shutil.copytree(world.dataset, root)
    return root


def on_verify(target: str, breaker: Callable[[Path], None]) -> Callable[[World], Call]:
    """``segmenter verify`` of a dataset copy whose ``target`` file is broken."""

    def make(world: World) -> Call:
        root = _dataset_copy(world)
        breaker(root / target)
        return Call(["verify", str(root)], names=root / target)

    return make


def on_plan(target: str, breaker: Callable[[Path], None]) -> Callable[[World], Call]:
    """``segmenter plan`` of a dataset copy whose ``target`` file is broken."""

    def make(world: World) -> Call:
        root = _dataset_copy(world)
        breaker(root / target)
        out = world.tmp / "plan"
        return Call(["plan", str(root), "--out", str(out)], names=root / target, output=out)

    return make


def on_train(target: str, breaker: Callable[[Path], None]) -> Callable[[World], Call]:
    """``segmenter train`` of the tiny config on a dataset copy whose ``target`` is broken."""

    def make(world: World) -> Call:
        from tiny import write_tiny_config

        root = _dataset_copy(world)
        breaker(root / target)
        config = write_tiny_config(world.tmp / "tiny.yaml", root)
        out = world.tmp / "run_out"
        argv = ["train", "--config", str(config), "--out", str(out)]
        return Call(argv, names=root / target, output=out)

    return make


TEST_CASE = "phantom_test_000"


def on_predict(
    breaker: Callable[[Path], None], channels: Sequence[int] = (0,), n_files: int = 2
) -> Callable[[World], Call]:
    """``segmenter predict`` of a test case (``n_files`` channel files) whose ``channels`` are
    broken, into an output folder (the message must name the first broken one)."""

    def make(world: World) -> Call:
        folder = world.tmp / "in"
        folder.mkdir()
        paths = []
        for c in range(n_files):
            src = world.dataset / "imagesTs" / f"{TEST_CASE}_{min(c, 1):04d}.nii.gz"
            paths.append(Path(shutil.copy(src, folder / f"{TEST_CASE}_{c:04d}.nii.gz")))
        for c in channels:
            breaker(paths[c])
        out = world.tmp / "out"
        argv = ["predict", "--model", str(world.run), "--input", *map(str, paths),
                "--output", str(out), "--no-tta", "--device", "cpu"]  # fmt: skip
        return Call(argv, names=paths[channels[0]], output=out)

    return make


def on_evaluate(breaker: Callable[[Path], None]) -> Callable[[World], Call]:
    """``segmenter evaluate`` of the test labels as predictions, one of them broken."""

    def make(world: World) -> Call:
        pred = world.tmp / "pred"
        shutil.copytree(world.dataset / "labelsTs", pred)
        target = pred / f"{TEST_CASE}.nii.gz"
        breaker(target)
        out = world.tmp / "eval"
        argv = ["evaluate", "--pred", str(pred), "--ref", str(world.dataset / "labelsTs"),
                "--out", str(out), "--workers", "1"]  # fmt: skip
        return Call(argv, names=target, output=out)

    return make


def with_config(text: Callable[[World], str], command: str = "train") -> Callable[[World], Call]:
    """``train`` (or ``plan``) with a config file whose text is ``text(world)``; the marker a
    constructing tag would create is ``tmp/MARKER``."""

    def make(world: World) -> Call:
        config = world.tmp / "bad.yaml"
        config.write_bytes(text(world).encode("utf-8", "surrogateescape"))
        out = world.tmp / "out"
        if command == "plan":
            argv = ["plan", str(world.dataset), "--config", str(config), "--out", str(out)]
        else:
            argv = ["train", "--config", str(config), "--out", str(out)]
        return Call(argv, names=config, output=out, marker=world.tmp / "MARKER")

    return make


def with_checkpoint(
    damage: Callable[[Path, Path], None], resume: bool = False
) -> Callable[[World], Call]:
    """``predict`` (or ``train --resume``) with a copy of the run whose ``best.pt`` (or
    ``last.pt``) went through ``damage(checkpoint, marker)``."""

    def make(world: World) -> Call:
        run = world.tmp / "run"
        shutil.copytree(world.run, run)
        checkpoint = run / "checkpoints" / ("last.pt" if resume else "best.pt")
        marker = world.tmp / "MARKER"
        damage(checkpoint, marker)
        if resume:
            return Call(["train", "--resume", "--out", str(run)], names=checkpoint, marker=marker)
        case = [str(world.dataset / "imagesTs" / f"{TEST_CASE}_{c:04d}.nii.gz") for c in (0, 1)]
        out = world.tmp / "out"
        argv = ["predict", "--model", str(run), "--input", *case, "--output", str(out),
                "--device", "cpu"]  # fmt: skip
        return Call(argv, names=checkpoint, output=out, marker=marker)

    return make


def _torch_save(state_of: Callable[[dict[str, Any], Path], Any]) -> Callable[[Path, Path], None]:
    """A checkpoint damage: save ``state_of(loaded state, marker)`` in its place."""

    def damage(checkpoint: Path, marker: Path) -> None:
        import torch

        state = torch.load(checkpoint, weights_only=True)
        torch.save(state_of(state, marker), checkpoint)

    return damage


def _pair_edit(edit: Callable[[Path, World], Path]) -> Callable[[World], Call]:
    """``evaluate`` whose prediction folder went through ``edit(folder, world)`` (which returns
    the file the message must name)."""

    def make(world: World) -> Call:
        pred = world.tmp / "pred"
        shutil.copytree(world.dataset / "labelsTs", pred)
        names = edit(pred, world)
        out = world.tmp / "eval"
        argv = ["evaluate", "--pred", str(pred), "--ref", str(world.dataset / "labelsTs"),
                "--out", str(out), "--workers", "1"]  # fmt: skip
        return Call(argv, names=names, output=out)

    return make


def _unpaired(pred: Path, world: World) -> Path:
    extra = pred / "stray_case.nii.gz"
    shutil.copy(pred / f"{TEST_CASE}.nii.gz", extra)
    return extra


def _without_prediction(pred: Path, world: World) -> Path:
    victim = sorted(pred.iterdir())[-1]
    victim.unlink()
    return world.dataset / "labelsTs" / victim.name


def _empty_mask(output: Path) -> bool:
    masks = [p for p in output.iterdir() if p.name.endswith(".nii.gz")]
    return len(masks) == 1 and not read_image(masks[0]).array.any()


def _scan_folder_as_input(world: World) -> Call:
    folder = world.tmp / f"{TEST_CASE}_0000.nii.gz"
    folder.mkdir()
    second = world.dataset / "imagesTs" / f"{TEST_CASE}_0001.nii.gz"
    out = world.tmp / "out"
    argv = ["predict", "--model", str(world.run), "--input", str(folder), str(second),
            "--output", str(out)]  # fmt: skip
    return Call(argv, names=folder, output=out)


# ------------------------------------------------------------------------------ the matrix

IMG = "imagesTr/phantom_001_0000.nii.gz"
IMG1 = "imagesTr/phantom_001_0001.nii.gz"
LABEL = "labelsTr/phantom_001.nii.gz"
NOT_POSITIVE = r"voxel size \(pixdim\) .* mm is not positive and finite"
_BOMB = "train:\n  epochs:\n    - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)

#: Header faults, each given to predict (channel 0 of a test case) and verify (a training scan).
HEADER_FAULTS: list[tuple[str, Callable[[Path], None], str]] = [
    ("pixdim zero", header(pixdim__1=0.0), NOT_POSITIVE),
    ("pixdim negative", header(pixdim__2=-1.0), NOT_POSITIVE),
    ("pixdim NaN", header(pixdim__3=np.nan), NOT_POSITIVE),
    ("affine singular", header(srow_y=[0, 0, 0, 0]), "the affine is singular"),
    ("affine NaN", header(srow_x=[np.nan, 0, 0, 0]), r"sform \(srow_x/y/z\) has non-finite"),
    ("qform and sform disagree", header(srow_x=[1, 0, 0, 25]), "qform and sform disagree"),
    ("scl_slope inf", header(scl_slope=np.inf), "scl_slope is inf"),
    ("sform_code unknown", header(sform_code=9), "sform_code 9 is not a NIfTI code"),
    ("2D array", as_array(lambda a: a[:, :, 0]), "expected a 3D volume, got 2D|2D image"),
    ("4D array", as_array(lambda a: np.stack([a, a], -1)), "expected a 3D volume, got 4D|4D image"),
    ("5D array", as_array(lambda a: a[..., None, None].repeat(2, 4)), "got 5D|5D image"),
    ("complex voxels", as_array(lambda a: a.astype(np.complex64)), "complex voxels"),
    ("boolean voxels (DT_BINARY)", header(datatype=1, bitpix=1), r"datatype 1 \(binary\)"),
    ("truncated .nii.gz", truncated, r"header claims .* but the file holds|cannot read image"),
    ("non-gzip .nii.gz", not_gzip, "cannot read image"),
    ("empty file", emptied, "cannot read image"),
    ("huge NIfTI-2 header (40000^3)", huge(nifti2=True), r"header claims 40000x40000x40000"),
    ("huge NIfTI-1 header (32767^3)", huge(nifti2=False), r"header claims 32767x32767x32767"),
]


def _header_matrix() -> list[BadInput]:
    cases = []
    for fault, breaker, problem in HEADER_FAULTS:
        cases.append(BadInput(fault, "predict", on_predict(breaker), problem))
        cases.append(BadInput(fault, "verify", on_verify(IMG, breaker), problem))
    return cases


def _voxel_and_grid_matrix() -> list[BadInput]:
    nan, inf = voxel(np.nan), voxel(np.inf)
    grid = "grid differs from channel 0|affine mismatch: origin off"
    return [
        BadInput("NaN voxels", "predict", on_predict(nan), r"non-finite voxels \(1 NaN"),
        BadInput("inf voxels", "predict", on_predict(inf), r"non-finite voxels \(0 NaN, 1 inf"),
        BadInput("NaN voxels", "verify", on_verify(IMG, nan), "NaN voxels: 1 of"),
        BadInput("inf voxels", "verify", on_verify(IMG, inf), "inf voxels: 1 of"),
        BadInput("NaN voxels", "train", on_train(IMG, nan), r"non-finite voxels \(1 NaN"),
        BadInput("NaN voxels", "plan", on_plan(IMG, nan), r"non-finite voxels \(1 NaN"),
        BadInput("NaN voxels", "evaluate", on_evaluate(nan), "NaN or inf voxels"),
        BadInput("huge header", "evaluate", on_evaluate(huge(nifti2=True)), "header claims"),
        BadInput("truncated", "evaluate", on_evaluate(truncated), "header claims|cannot read"),
        BadInput("truncated", "train", on_train(IMG, truncated), "header claims|cannot read"),
        BadInput(
            "qform and sform disagree",
            "train",
            on_train(IMG, header(srow_x=[1, 0, 0, 9])),
            "qform and sform disagree",
        ),
        BadInput("channel on another grid", "predict", on_predict(shifted(4.0), (1,)), grid),
        BadInput("channel on another grid", "verify", on_verify(IMG1, shifted(4.0)), grid),
        BadInput("channel on another grid", "train", on_train(IMG1, shifted(4.0)), grid),
        BadInput("label on another grid", "plan", on_plan(LABEL, shifted(4.0)), grid),
        BadInput(
            "channel of another shape",
            "predict",
            on_predict(as_array(lambda a: a[:, :, :-1]), (1,)),
            "differs from channel 0",
        ),
        BadInput(
            "channel missing",
            "predict",
            on_predict(lambda p: None, n_files=1),
            r"expects 2 channel\(s\) .* but 1 input file",
        ),
        BadInput(
            "channel extra",
            "predict",
            on_predict(lambda p: None, n_files=3),
            r"expects 2 channel\(s\) .* but 3 input file",
        ),
        BadInput("channel missing", "verify", on_verify(IMG1, Path.unlink), "missing channel 1"),
        BadInput("channel missing", "train", on_train(IMG1, Path.unlink), "missing channel 1"),
        BadInput(
            "channel extra",
            "verify",
            on_verify(
                "imagesTr/phantom_001_0002.nii.gz",
                lambda p: shutil.copy(p.with_name("phantom_001_0001.nii.gz"), p),
            ),
            "undeclared channel 2",
        ),
        BadInput("folder named like a scan", "verify", on_verify(IMG, a_folder), "folder"),
        BadInput("folder named like a scan", "predict", _scan_folder_as_input, "folder"),
    ]


def _label_matrix() -> list[BadInput]:
    fractional, negative = voxel(0.5), voxel(-1, np.int16)
    undeclared = voxel(3, np.uint8)
    return [
        BadInput("fractional label", "verify", on_verify(LABEL, fractional), "non-integer label"),
        BadInput("fractional label", "train", on_train(LABEL, fractional), "non-integer label"),
        BadInput("fractional label", "plan", on_plan(LABEL, fractional), "non-integer label"),
        BadInput(
            "negative label", "verify", on_verify(LABEL, negative), "undeclared label values -1"
        ),
        BadInput("negative label", "train", on_train(LABEL, negative), "negative label values"),
        BadInput(
            "undeclared label", "verify", on_verify(LABEL, undeclared), "undeclared label values 3"
        ),
        BadInput(
            "undeclared label", "train", on_train(LABEL, undeclared), "undeclared label values 3"
        ),
        BadInput(
            "undeclared label", "plan", on_plan(LABEL, undeclared), "undeclared label values 3"
        ),
        BadInput("fractional prediction", "evaluate", on_evaluate(fractional), "non-integer label"),
        BadInput("negative prediction", "evaluate", on_evaluate(negative), "negative label"),
        BadInput(
            "prediction of another shape",
            "evaluate",
            on_evaluate(as_array(lambda a: a[:, :, :-1])),
            "does not match reference",
        ),
        BadInput(
            "prediction on another grid",
            "evaluate",
            on_evaluate(shifted(3.0)),
            r"geometry \(affine\) does not match",
        ),
        BadInput("prediction without reference", "evaluate", _pair_edit(_unpaired), "no reference"),
        BadInput(
            "reference without prediction",
            "evaluate",
            _pair_edit(_without_prediction),
            "no prediction for case",
        ),
    ]


def _config_matrix() -> list[BadInput]:
    tag = "train: !!python/object/apply:os.system ['touch {marker}']\n"
    return [
        BadInput(
            "YAML tag constructing an object",
            "train",
            with_config(lambda w: tag.format(marker=w.tmp / "MARKER")),
            "not valid YAML .*could not determine a constructor",
        ),
        BadInput("alias bomb", "train", with_config(lambda w: _BOMB), "alias bomb"),
        BadInput("alias bomb", "plan", with_config(lambda w: _BOMB, "plan"), "alias bomb"),
        BadInput(
            "recursive alias", "train", with_config(lambda w: "train: &r [*r]\n"), "alias bomb"
        ),
        BadInput(
            "wrong type",
            "train",
            with_config(lambda w: "train:\n  epochs: ten\n"),
            "train.epochs: expected an integer, got 'ten'",
        ),
        BadInput(
            "unknown key",
            "train",
            with_config(lambda w: "train:\n  epoch: 3\n"),
            "unknown config key 'train.epoch'; valid keys",
        ),
        BadInput(
            "not UTF-8", "train", with_config(lambda w: "train: \udcff\udcfe\n"), "not UTF-8 text"
        ),
        BadInput(
            "not a mapping",
            "plan",
            with_config(lambda w: "- 1\n- 2\n", "plan"),
            "a config must be a mapping",
        ),
    ]


def _checkpoint_matrix() -> list[BadInput]:
    def truncate(path: Path, marker: Path) -> None:
        path.write_bytes(path.read_bytes()[:300])

    def text(path: Path, marker: Path) -> None:
        path.write_text("epoch: 3\n")

    def code(state: dict[str, Any], marker: Path) -> dict[str, Any]:
        return {**state, "extra": WritesAMarker(marker)}

    weights = _torch_save(lambda s, m: {**s, "model": {"conv.weight": np.zeros(3).tolist()}})
    newer = _torch_save(lambda s, m: {**s, "format": int(s["format"]) + 1})
    config = _torch_save(lambda s, m: {**s, "config": {"bogus": 1}})
    return [
        BadInput(
            "truncated checkpoint",
            "predict",
            with_checkpoint(truncate),
            r"cannot read checkpoint \(not a complete torch zip file",
        ),
        BadInput(
            "foreign file as checkpoint", "predict", with_checkpoint(text), "cannot read checkpoint"
        ),
        BadInput("foreign weights", "predict", with_checkpoint(weights), "weights do not fit"),
        BadInput(
            "foreign config", "predict", with_checkpoint(config), "bad config in the checkpoint"
        ),
        BadInput(
            "newer format", "predict", with_checkpoint(newer), "checkpoint format 2, expected 1"
        ),
        BadInput(
            "pickle that runs code",
            "predict",
            with_checkpoint(_torch_save(code)),
            r"cannot read checkpoint \(it holds pickled objects, .* refused, not loaded",
        ),
        BadInput(
            "truncated checkpoint",
            "train",
            with_checkpoint(truncate, resume=True),
            r"cannot read checkpoint \(not a complete torch zip file",
        ),
        BadInput(
            "pickle that runs code",
            "train",
            with_checkpoint(_torch_save(code), True),
            r"cannot read checkpoint \(it holds pickled objects, .* refused, not loaded",
        ),
        BadInput(
            "foreign weights", "train", with_checkpoint(weights, resume=True), "weights do not fit"
        ),
    ]


def _accepted_matrix() -> list[BadInput]:
    zero = as_array(np.zeros_like)
    singleton = as_array(lambda a: a[..., None])
    return [
        BadInput(
            "4D with a trailing singleton axis",
            "verify",
            on_verify(IMG, singleton),
            r"(?m): ok$",
            accepted=True,
        ),
        BadInput(
            "scl_slope NaN (no scaling)",
            "verify",
            on_verify(IMG, header(scl_slope=np.nan)),
            r"(?m): ok$",
            accepted=True,
        ),
        BadInput(
            "all-zero scan",
            "predict",
            on_predict(zero, (0, 1)),
            "every channel is constant",
            accepted=True,
            check_output=_empty_mask,
        ),
        BadInput(
            "one all-zero channel",
            "predict",
            on_predict(zero, (1,)),
            r"every voxel is 0 \(an empty scan\?\)",
            accepted=True,
        ),
    ]


def all_cases() -> list[BadInput]:
    """Every entry of the matrix, in a stable order with unique ids."""
    cases = (_header_matrix() + _voxel_and_grid_matrix() + _label_matrix() + _config_matrix()
             + _checkpoint_matrix() + _accepted_matrix())  # fmt: skip
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
    return cases


# ------------------------------------------------------------------------------ judging


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` of every file under ``roots``; a folder is ``(-1, 0)`` (its
    mtime moves whenever an entry comes and goes)."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            st = path.lstat()
            out[str(path)] = (-1, 0) if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def _report_lines(case: BadInput, call: Call, outcome: Outcome) -> list[str]:
    """The lines that carry the verdict: ``error:`` lines, or verify's report lines."""
    if case.command == "verify":
        return [line for line in outcome.stdout.splitlines() if line.startswith(f"{call.names}")]
    # a progress bar ends with a carriage return, and the line after it overwrites it
    lines = re.split(r"[\r\n]", outcome.stderr)
    return [line for line in lines if line.startswith(ERROR_PREFIX)]


def data_lost(outcome: Outcome) -> bool:
    """Whether a file that was there before changed or vanished, or a temporary file stayed."""
    changed = [p for p, v in outcome.before.items() if outcome.after.get(p) != v]
    temporary = [p for p in outcome.after if ".tmp" in Path(p).name]
    return bool(changed or temporary)


def judge(case: BadInput, call: Call, outcome: Outcome) -> list[str]:
    """What the command got wrong against the case's decision (empty: handled).

    A refusal must exit 2 with exactly one message line naming ``call.names`` and matching
    ``case.problem``, print no traceback, write nothing and run nothing; an acceptance must
    exit 0, say ``case.problem`` (a warning, or verify's ``ok``) and write its output.
    """
    wrong: list[str] = []
    printed = outcome.stdout + outcome.stderr
    if "Traceback" in printed:
        wrong.append("printed a traceback")
    if call.marker is not None and call.marker.exists():
        wrong.append(f"ran code from the input ({call.marker.name} exists)")
    if data_lost(outcome):
        wrong.append("changed or removed a file that was there, or left a temporary file")
    if case.accepted:
        if outcome.code != 0:
            wrong.append(f"exit {outcome.code}, expected 0")
        if not re.search(case.problem, printed):
            wrong.append(f"no line matching {case.problem!r}")
        if call.output is not None and case.check_output is not None:
            if not (call.output.exists() and case.check_output(call.output)):
                wrong.append("its output is not what was decided")
        return wrong
    if outcome.code != 2:
        wrong.append(f"exit {outcome.code}, expected 2")
    lines = _report_lines(case, call, outcome)
    if len(lines) != 1:
        wrong.append(f"{len(lines)} message lines, expected 1: {lines[:3]}")
    elif str(call.names) not in lines[0] or not re.search(case.problem, lines[0]):
        wrong.append(f"message {lines[0]!r} does not name {call.names} and {case.problem!r}")
    new = sorted(set(outcome.after) - set(outcome.before))
    if new:
        wrong.append(f"wrote {len(new)} file(s), e.g. {new[0]}")
    return wrong


def message(case: BadInput, call: Call, outcome: Outcome) -> str:
    """The one line that says what happened (the error line, verify's report line, or the
    matching warning)."""
    lines = _report_lines(case, call, outcome)
    if case.accepted or not lines:
        text = outcome.stdout + outcome.stderr
        found = re.search(case.problem, text)
        if found is None:
            return ""
        start = max(text.rfind("\n", 0, found.start()), text.rfind("\r", 0, found.start()))
        end = text.find("\n", found.end())
        return text[start + 1 : end if end >= 0 else len(text)].strip()
    return lines[0]


# ------------------------------------------------------------------------------ running


@contextlib.contextmanager
def _captured() -> Iterator[tuple[text_io.StringIO, text_io.StringIO]]:
    """stdout and stderr (with the package's log records) into buffers."""
    out, err = text_io.StringIO(), text_io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("segmenter")
    pkg.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        pkg.removeHandler(handler)


def run_case(case: BadInput, world: World) -> tuple[Call, Outcome]:
    """Make the case's bad input in ``world`` and run its command in-process."""
    from segmenter.cli import main

    call = case.make(world)
    roots = (world.tmp, world.dataset, world.run)
    before = snapshot(*roots)
    with _captured() as (out, err):
        code = main(call.argv)
    return call, Outcome(code, out.getvalue(), err.getvalue(), before, snapshot(*roots))


@dataclass(frozen=True)
class Row:
    """One printed row of the matrix."""

    fault: str
    command: str
    happened: str
    handled: bool
    data_lost: int
    wrong: list[str] = field(default_factory=list)


def bad_input_rows(
    cases: Sequence[BadInput] | None = None, workdir: Path | None = None
) -> list[Row]:
    """Run the matrix outside pytest: one :class:`Row` per case (fault, command, what happened,
    handled, data lost 0/1), for ``scripts/fault_matrix.py``.

    Builds its own world first (the phantom dataset and a tiny trained run, about half a
    minute on two cores) in ``workdir`` (default: a temporary folder, removed afterwards).
    """
    from tiny import train_tiny_run, write_phantoms

    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        dataset = write_phantoms(root / "phantoms")
        run = train_tiny_run(root / "trained", dataset)
        rows = []
        for i, case in enumerate(cases if cases is not None else all_cases()):
            tmp = root / "cases" / f"{i:03d}"
            tmp.mkdir(parents=True)
            call, outcome = run_case(case, World(dataset, run, tmp))
            wrong = judge(case, call, outcome)
            happened = f"exit {outcome.code}: {message(case, call, outcome)}"
            rows.append(Row(case.fault, case.command, happened, not wrong,
                            int(data_lost(outcome)), wrong))  # fmt: skip
        return rows


__all__ = [
    "BadInput",
    "Call",
    "Outcome",
    "Row",
    "World",
    "all_cases",
    "bad_input_rows",
    "judge",
    "run_case",
]
