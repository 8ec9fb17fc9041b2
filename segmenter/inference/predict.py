"""``segmenter predict``: run trained models on new scans and write masks in their own geometry.

Reads one case (one file per channel, in channel order) or an imagesTs-style folder and, for
each model (one run, several runs, or a crossval folder's folds), applies that run's
preprocessing (reorientation, crop to nonzero, resampling to its target spacing when it has
one, intensity clipping and z-score), predicts with the sliding window (mirroring TTA by
default) and puts the probabilities back into the scan's grid (linear resampling, uncropping,
original axis order). The models' probabilities are averaged, thresholded, lesions below a
minimum size in mm3 removed, and a uint8 mask (and optionally the float32 probability map) is
written with the input's geometry.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.data.layout import Case, find_cases
from segmenter.errors import InputError
from segmenter.evaluation.postprocess import probabilities_to_mask
from segmenter.inference.predictor import Predictor
from segmenter.inference.sliding_window import foreground_probability, predict_logits
from segmenter.io import Image, is_image_file, read_info, strip_suffix, suffix_of, write_like
from segmenter.locking import FolderLock, remove_unused
from segmenter.planning.memory import InferenceSetting, check_prediction
from segmenter.planning.run_plan import RunPlan
from segmenter.preprocessing.case import preprocess_arrays, read_case

PROBABILITY_FOLDER = "probabilities"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    """Per-call overrides of the run's inference settings (None keeps the run's value)."""

    tta: bool | None = None
    mirroring: str | None = None
    threshold: float | None = None
    min_lesion_mm3: float | None = None
    save_probabilities: bool = False

    def postprocessing(self, plan: RunPlan) -> tuple[float, float]:
        """Threshold and minimum lesion size (mm3): these options' where set, else the
        plan's (the run's tuned defaults, see
        :func:`segmenter.inference.predictor.load_predictor`)."""
        threshold = plan.threshold if self.threshold is None else self.threshold
        min_mm3 = plan.min_lesion_mm3 if self.min_lesion_mm3 is None else self.min_lesion_mm3
        return threshold, min_mm3


@dataclass(frozen=True)
class Prediction:
    """One written case."""

    case_id: str
    mask_path: Path
    probability_path: Path | None
    seconds: float
    n_lesion_voxels: int


def collect_cases(inputs: Sequence[str | Path], predictor: Predictor) -> list[Case]:
    """Cases from ``--input``: channel files of one case, or one folder of cases.

    Raises:
        InputError: missing paths, wrong number of channels, bad file names.
    """
    n_channels = len(predictor.channel_names)
    paths = [Path(p) for p in inputs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise InputError(f"{missing[0]}: input not found")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        endings = sorted({suffix_of(p) for p in folder.iterdir() if is_image_file(p)})
        if not endings:
            raise InputError(f"{folder}: no image files found")
        ending = predictor.plan.file_ending
        cases = find_cases(folder, n_channels, ending if ending in endings else endings[0])
        if not cases:
            raise InputError(f"{folder}: no cases named CASE_XXXX{endings[0]} found")
        return list(cases)
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise InputError(
            f"{folders[0]}: is a folder; --input takes one folder, or one file per channel "
            f"(not both)"
        )
    if len(paths) != n_channels:
        names = ", ".join(predictor.channel_names)
        raise InputError(
            f"{paths[0]}: the model expects {n_channels} channel(s) ({names}) but {len(paths)} "
            f"input file(s) were given; pass one file per channel in that order"
        )
    case_id = strip_suffix(paths[0])
    if len(case_id) > 5 and case_id[-5] == "_" and case_id[-4:].isdigit():
        case_id = case_id[:-5]
    return [Case(case_id=case_id, images=tuple(paths), label=None)]


def output_paths(
    cases: Sequence[Case], output: str | Path, *, single_file_ok: bool
) -> dict[str, Path]:
    """Mask path per case: ``OUTPUT`` itself for one case given as a file name, else a folder."""
    out = Path(output)
    if single_file_ok and len(cases) == 1 and is_image_file(out):
        return {cases[0].case_id: out}
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output exists and is not a folder")
    ending = suffix_of(cases[0].images[0]) if cases else ".nii.gz"
    return {c.case_id: out / f"{c.case_id}{ending}" for c in cases}


def ensemble(predictor: Predictor | Sequence[Predictor]) -> list[Predictor]:
    """One or several predictors as a list, checked to take and give the same things.

    Raises:
        InputError: no predictor, or models with other channels or output activation.
    """
    models = [predictor] if isinstance(predictor, Predictor) else list(predictor)
    if not models:
        raise InputError("no model to predict with")
    first = models[0]
    for other in models[1:]:
        if other.channel_names != first.channel_names:
            raise InputError(
                f"{other.checkpoint}: channels {other.channel_names} differ from "
                f"{first.checkpoint}'s {first.channel_names}"
            )
        if other.plan.activation != first.plan.activation:
            raise InputError(f"{other.checkpoint}: another output activation than the others")
    return models


def _warn_constant_channels(case: Case, images: Sequence[Image]) -> bool:
    """Warn about each channel whose voxels all hold one value (an empty or blank scan).

    Returns:
        Whether any channel has contrast (more than one value).
    """
    varied = False
    for path, img in zip(case.images, images, strict=True):
        low, high = float(img.array.min()), float(img.array.max())
        if low == high:
            logger.warning("%s: every voxel is %g (an empty scan?)", path, low)
        varied = varied or low != high
    return varied


def check_headers(cases: Sequence[Case]) -> None:
    """Read every input's header before anything is written, so that a broken file refuses the
    whole call instead of stopping it halfway through a folder.

    Raises:
        InputError: an unreadable file or header, or one that is not a 3D volume.
    """
    for case in cases:
        for path in case.images:
            info = read_info(path)
            spatial = info.shape
            while len(spatial) > 3 and spatial[-1] == 1:
                spatial = spatial[:-1]
            if len(spatial) != 3:
                raise InputError(
                    f"{path}: expected a 3D volume, got {len(spatial)}D shape {info.shape}"
                )


def predict_probability(
    predictor: Predictor | Sequence[Predictor], case: Case, options: PredictOptions
) -> tuple[np.ndarray, Image]:
    """Foreground probabilities of one case on its own grid, averaged over the models.

    Each model applies its own run's preprocessing (crop, target spacing), and its
    probabilities are brought back to the scan's grid before averaging. A channel whose voxels
    all hold one value is warned about; when every channel does (an all-zero scan), the
    probabilities are 0 without running the models, so its mask is empty.

    Returns:
        ``(X, Y, Z)`` float32 probabilities and the case's channel 0 (its geometry).

    Raises:
        InputError: unreadable files, or another number of channels than the models take.
    """
    models = ensemble(predictor)
    images, _ = read_case(case, with_label=False)
    n_channels = len(models[0].channel_names)
    if len(images) != n_channels:
        raise InputError(
            f"{case.images[0]}: the model expects {n_channels} channel(s), "
            f"the case has {len(images)}"
        )
    if not _warn_constant_channels(case, images):
        logger.warning("%s: every channel is constant: its mask is empty", case.case_id)
        return np.zeros(images[0].array.shape, dtype=np.float32), images[0]
    total: np.ndarray | None = None
    for model in models:
        pre = preprocess_arrays(
            [im.array for im in images], None, images[0].affine, images[0].spacing,
            case_id=case.case_id, spec=model.plan.preprocessing,
        )  # fmt: skip
        logits = predict_logits(
            model.model, pre.image, model.patch_size, model.config.inference,
            device=model.device, dtype=model.dtype, tta=options.tta,
            mirroring=options.mirroring,
        )  # fmt: skip
        prob = pre.restore(foreground_probability(logits, model.plan.activation))
        total = prob if total is None else total + prob
    assert total is not None
    return (total / len(models)).astype(np.float32), images[0]


def predict_case(
    predictor: Predictor | Sequence[Predictor], case: Case, mask_path: Path, options: PredictOptions
) -> Prediction:
    """Predict one case (one model, or the mean probability of several) and write its mask
    (and probabilities when asked). Threshold and minimum lesion size: ``options``, else the
    first model's run (its tuned post-processing, when it has one)."""
    start = time.perf_counter()
    models = ensemble(predictor)
    prob, reference = predict_probability(models, case, options)
    threshold, min_mm3 = options.postprocessing(models[0].plan)
    mask = probabilities_to_mask(
        prob, reference.spacing, threshold=threshold, min_lesion_mm3=min_mm3
    )
    write_like(mask_path, mask, reference)
    prob_path = None
    if options.save_probabilities:
        prob_path = mask_path.parent / PROBABILITY_FOLDER / mask_path.name
        write_like(prob_path, prob, reference)
    return Prediction(
        case_id=case.case_id,
        mask_path=mask_path,
        probability_path=prob_path,
        seconds=time.perf_counter() - start,
        n_lesion_voxels=int(mask.sum()),
    )


def memory_settings(
    predictor: Predictor | Sequence[Predictor], options: PredictOptions
) -> list[InferenceSetting]:
    """What the memory estimate needs of each model: its window, TTA and device."""
    return [
        InferenceSetting.of_run(
            m.plan, m.config, tta=options.tta, on_accelerator=m.device.type != "cpu"
        )
        for m in ensemble(predictor)
    ]


def predict_all(
    predictor: Predictor | Sequence[Predictor],
    inputs: Sequence[str | Path],
    output: str | Path,
    options: PredictOptions,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> list[Prediction]:
    """Predict every case of ``inputs`` into ``output`` with one model or the mean of several
    (see the module docstring).

    Before anything is read or written, every case's headers are checked against the memory
    available (:func:`segmenter.planning.memory.check_prediction`).

    Raises:
        InputError: bad inputs, or a case whose prediction would not fit in memory.
    """
    predictor = ensemble(predictor)
    cases = collect_cases(inputs, predictor[0])
    single = len(inputs) >= 1 and not Path(inputs[0]).is_dir()
    paths = output_paths(cases, output, single_file_ok=single)
    check_headers(cases)
    check_prediction(cases, memory_settings(predictor, options))
    iterable: Iterable[Case] = cases
    if progress is not None:
        iterable = progress(cases, len(cases))
    one_file = list(paths.values()) == [Path(output)]
    created = not Path(output).exists()
    try:
        with contextlib.nullcontext() if one_file else FolderLock(output, "predict"):
            return [predict_case(predictor, c, paths[c.case_id], options) for c in iterable]
    except InputError:
        if created and not one_file:
            remove_unused(Path(output))  # refused before any mask: leave no empty folder
        raise
