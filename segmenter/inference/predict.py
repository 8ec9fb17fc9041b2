"""``segmenter predict``: run trained models on new scans and write masks in their own geometry.

Reads one case (one file per channel, in channel order) or an imagesTs-style folder and, for
each model (one run, several runs, or a crossval folder's folds), applies that run's
preprocessing (reorientation, crop to nonzero, resampling to its target spacing when it has
one, intensity clipping and z-score), predicts with the sliding window (mirroring TTA by
default) and puts the probabilities back into the scan's grid (linear resampling, uncropping,
original axis order). The models' probabilities are averaged, thresholded, lesions below a
minimum size in mm3 removed, and a uint8 mask (and optionally the float32 probability map) is
written with the input's geometry.

A folder of cases is streamed: the next case's files are read in a background thread while the
current one is predicted (one case ahead at most, so two cases are in memory at a time), and
its masks are the ones predicting case by case gives. Every write is atomic (a temporary file
renamed), so a mask or probability file exists under its name only once complete; with
``resume`` the cases whose outputs all exist are skipped, and the temporary files a killed run
left in the output folder are removed under its lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmenter.atomic import remove_stale_temporaries
from segmenter.config import InferenceConfig
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
    overlap: float | None = None
    threshold: float | None = None
    min_lesion_mm3: float | None = None
    save_probabilities: bool = False

    def inference(self, cfg: InferenceConfig) -> InferenceConfig:
        """A run's inference settings with these options' TTA, mirroring and overlap where set.

        Raises:
            ConfigError: an overlap outside [0, 1).
        """
        changes = {"tta": self.tta, "mirroring": self.mirroring, "overlap": self.overlap}
        return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})

    def postprocessing(self, plan: RunPlan) -> tuple[float, float]:
        """Threshold and minimum lesion size (mm3): these options' where set, else the
        plan's (the run's tuned defaults, see
        :func:`segmenter.inference.predictor.load_predictor`)."""
        threshold = plan.threshold if self.threshold is None else self.threshold
        min_mm3 = plan.min_lesion_mm3 if self.min_lesion_mm3 is None else self.min_lesion_mm3
        return threshold, min_mm3


@dataclass(frozen=True)
class Prediction:
    """One case: written now, or (``skipped``) found complete by ``resume``.

    Attributes:
        seconds: the time reading, predicting and writing took (0 when skipped).
        n_lesion_voxels: foreground voxels of the mask written; None when skipped (not read).
    """

    case_id: str
    mask_path: Path
    probability_path: Path | None
    seconds: float
    n_lesion_voxels: int | None
    skipped: bool = False


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
    predictor: Predictor | Sequence[Predictor],
    case: Case,
    options: PredictOptions,
    *,
    images: Sequence[Image] | None = None,
) -> tuple[np.ndarray, Image]:
    """Foreground probabilities of one case on its own grid, averaged over the models.

    Each model applies its own run's preprocessing (crop, target spacing), and its
    probabilities are brought back to the scan's grid before averaging. A channel whose voxels
    all hold one value is warned about; when every channel does (an all-zero scan), the
    probabilities are 0 without running the models, so its mask is empty.

    Args:
        predictor: one model or several (averaged).
        case: the case's channel files.
        options: TTA (the threshold and size are not used here).
        images: the case's channels already read (:func:`read_channels`); None reads them.

    Returns:
        ``(X, Y, Z)`` float32 probabilities and the case's channel 0 (its geometry).

    Raises:
        InputError: unreadable files, or another number of channels than the models take.
    """
    models = ensemble(predictor)
    if images is None:
        images = read_channels(case)
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
            model.model, pre.image, model.patch_size, options.inference(model.config.inference),
            device=model.device, dtype=model.dtype,
        )  # fmt: skip
        prob = pre.restore(foreground_probability(logits, model.plan.activation))
        total = prob if total is None else total + prob
    assert total is not None
    return (total / len(models)).astype(np.float32), images[0]


def read_channels(case: Case) -> list[Image]:
    """A case's channel images (:func:`segmenter.preprocessing.case.read_case`, no label).

    Raises:
        InputError: an unreadable file, channels on different grids, NaN/inf voxels.
    """
    images, _ = read_case(case, with_label=False)
    return images


def probability_path(mask_path: Path) -> Path:
    """Where ``--save-probabilities`` writes the map of the mask at ``mask_path``."""
    return mask_path.parent / PROBABILITY_FOLDER / mask_path.name


def predict_case(
    predictor: Predictor | Sequence[Predictor],
    case: Case,
    mask_path: Path,
    options: PredictOptions,
    *,
    images: Sequence[Image] | None = None,
) -> Prediction:
    """Predict one case (one model, or the mean probability of several) and write its mask
    (and probabilities when asked; :func:`probability_path`). Threshold and minimum lesion
    size: ``options``, else the first model's run (its tuned post-processing, when it has one).
    ``images``: the case's channels already read (see :func:`predict_probability`)."""
    start = time.perf_counter()
    models = ensemble(predictor)
    prob, reference = predict_probability(models, case, options, images=images)
    threshold, min_mm3 = options.postprocessing(models[0].plan)
    mask = probabilities_to_mask(
        prob, reference.spacing, threshold=threshold, min_lesion_mm3=min_mm3
    )
    write_like(mask_path, mask, reference)
    prob_path = None
    if options.save_probabilities:
        prob_path = probability_path(mask_path)
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


def outputs_complete(mask_path: Path, options: PredictOptions) -> bool:
    """Whether a case's outputs are all written: its mask and, with
    ``options.save_probabilities``, its probability map. Writes are atomic, so a file that
    exists is complete."""
    if not mask_path.is_file():
        return False
    return not options.save_probabilities or probability_path(mask_path).is_file()


class ReadAhead:
    """Reads cases' channels (:func:`read_channels`) in a background thread, one case ahead.

    :meth:`take` returns a case's channels, waiting for their read to end, and starts reading
    the next case of the list, so at most two cases' images are held at a time: the one taken
    (being predicted) and the next. A read's error (an :class:`InputError`) is raised by the
    :meth:`take` of its case. Use it as a context manager: on exit the thread ends (a read
    under way is finished, none is started).

    Args:
        cases: the cases, in the order they will be taken.
        read: what reads a case (default :func:`read_channels`).
    """

    def __init__(
        self, cases: Sequence[Case], read: Callable[[Case], list[Image]] | None = None
    ) -> None:
        self._cases = list(cases)
        self._read = read or read_channels
        self._index = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segmenter-read")
        self._ahead: Future[list[Image]] | None = None

    def __enter__(self) -> ReadAhead:
        self._start(0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _start(self, index: int) -> None:
        self._index = index
        inside = index < len(self._cases)
        self._ahead = self._pool.submit(self._read, self._cases[index]) if inside else None

    def take(self, case: Case) -> list[Image]:
        """``case``'s channel images; ``case`` must be the next of the list.

        Raises:
            InputError: the case's files could not be read (see :func:`read_channels`).
            ValueError: ``case`` is not the next case.
        """
        ahead = self._ahead
        if ahead is None or self._cases[self._index] is not case:
            raise ValueError(f"{case.case_id}: not the next case to read")
        self._ahead = None
        images = ahead.result()
        del ahead  # the future holds the images too: drop it before the next read starts
        self._start(self._index + 1)
        return images


def _skipped(case: Case, mask_path: Path, options: PredictOptions) -> Prediction:
    """A case ``resume`` finds complete (logged)."""
    logger.info("%s: finished before (%s exists), skipped", case.case_id, mask_path)
    prob_path = probability_path(mask_path) if options.save_probabilities else None
    return Prediction(case.case_id, mask_path, prob_path, 0.0, None, skipped=True)


def _predict_cases(
    models: Sequence[Predictor],
    cases: Sequence[Case],
    paths: dict[str, Path],
    options: PredictOptions,
    *,
    resume: bool,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None,
    on_case: Callable[[Prediction], None] | None,
) -> list[Prediction]:
    """:func:`predict_all` once the inputs are checked and the output folder locked: the
    finished cases skipped (with ``resume``), the others streamed (:class:`ReadAhead`)."""
    report = on_case or (lambda prediction: None)
    done: dict[str, Prediction] = {}
    for case in cases:
        if resume and outputs_complete(paths[case.case_id], options):
            done[case.case_id] = _skipped(case, paths[case.case_id], options)
            report(done[case.case_id])
    pending = [c for c in cases if c.case_id not in done]
    iterable: Iterable[Case] = pending if progress is None else progress(pending, len(pending))
    with ReadAhead(pending) as reader:
        for case in iterable:
            done[case.case_id] = predict_case(
                models, case, paths[case.case_id], options, images=reader.take(case)
            )
            report(done[case.case_id])
    return [done[c.case_id] for c in cases]


def _remove_stale(folder: Path) -> None:
    """Remove the temporary files a killed ``predict`` left in its output folder (and its
    probability folder; not in other subfolders, which other commands may own)."""
    stale = [p for sub in (folder, folder / PROBABILITY_FOLDER)
             for p in remove_stale_temporaries(sub, recursive=False)]  # fmt: skip
    if stale:
        names = ", ".join(str(p.relative_to(folder)) for p in stale)
        logger.info("removed %d temporary file(s) a killed run left: %s", len(stale), names)


def predict_all(
    predictor: Predictor | Sequence[Predictor],
    inputs: Sequence[str | Path],
    output: str | Path,
    options: PredictOptions,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
    *,
    resume: bool = False,
    on_case: Callable[[Prediction], None] | None = None,
) -> list[Prediction]:
    """Predict every case of ``inputs`` into ``output`` with one model or the mean of several
    (see the module docstring), reading each case while the one before it is predicted.

    Before anything is read or written, every case's headers are checked, and checked against
    the memory available (:func:`segmenter.planning.memory.check_prediction`). A folder output
    is locked (:class:`segmenter.locking.FolderLock`) and the temporary files a killed run left
    in it removed.

    Args:
        predictor: one model or several (their probabilities averaged).
        inputs: one case's channel files, or one folder of cases.
        output: the mask file (one case given as files) or folder.
        options: TTA, threshold, minimum lesion size, probability maps.
        progress: ``progress(cases, n)`` wraps the cases to predict (a progress bar).
        resume: skip the cases whose outputs are complete (:func:`outputs_complete`); without
            it, existing masks are overwritten.
        on_case: called with each case's :class:`Prediction` once it is written or skipped.

    Returns:
        One :class:`Prediction` per case, in input order (``skipped`` ones included).

    Raises:
        InputError: bad inputs, or a case whose prediction would not fit in memory; a case
            whose voxels cannot be read stops the call when it is reached (the cases before it
            are written).
    """
    predictor = ensemble(predictor)
    cases = collect_cases(inputs, predictor[0])
    single = len(inputs) >= 1 and not Path(inputs[0]).is_dir()
    paths = output_paths(cases, output, single_file_ok=single)
    check_headers(cases)
    check_prediction(cases, memory_settings(predictor, options))
    one_file = list(paths.values()) == [Path(output)]
    created = not Path(output).exists()
    try:
        with contextlib.nullcontext() if one_file else FolderLock(output, "predict"):
            if not one_file:
                _remove_stale(Path(output))
            return _predict_cases(
                predictor, cases, paths, options, resume=resume, progress=progress,
                on_case=on_case,
            )  # fmt: skip
    except InputError:
        if created and not one_file:
            remove_unused(Path(output))  # refused before any mask: leave no empty folder
        raise
