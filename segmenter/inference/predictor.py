"""A trained run loaded for inference: :class:`Predictor` and the run folders ``--model`` names.

- :func:`load_predictor`: ``RUN/checkpoints/best.pt`` (else ``last.pt``), its config and run
  plan, the network in eval mode on the chosen device, and the run's ``postprocessing.json``
  (tuned by ``segmenter crossval``) as its default threshold and minimum lesion size;
- :func:`model_runs` and :func:`load_predictors`: one run, several, or a cross-validation
  folder's ``fold_K`` runs (an ensemble).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segmenter.config import Config, config_from_dict
from segmenter.data.splits import fold_runs
from segmenter.errors import InputError
from segmenter.nn.checkpoint import find_checkpoint, load_checkpoint
from segmenter.nn.network import UNet3d, build_model
from segmenter.nn.runtime import autocast_dtype, resolve_device
from segmenter.planning.run_plan import RunPlan

#: File in a run folder holding tuned post-processing (threshold, minimum lesion size).
POSTPROCESSING_FILE = "postprocessing.json"


@dataclass(frozen=True)
class Predictor:
    """A trained model ready for inference, loaded from a run folder.

    Attributes:
        model: the network in eval mode, on ``device``.
        config: the run's resolved config.
        plan: the run's plan, its threshold and minimum lesion size those ``predict`` uses by
            default (the run's ``postprocessing.json`` when it has one).
        device: where the model runs.
        dtype: autocast dtype, or None for float32.
        checkpoint: the checkpoint file it was loaded from.
        postprocessing_file: the ``postprocessing.json`` that set the plan's threshold and
            minimum lesion size, or None.
    """

    model: torch.nn.Module
    config: Config
    plan: RunPlan
    device: torch.device
    dtype: torch.dtype | None
    checkpoint: Path
    postprocessing_file: Path | None = None

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Sliding-window size (the training patch)."""
        return self.plan.patch_size

    @property
    def channel_names(self) -> list[str]:
        """Input channels in order, as named in the training dataset."""
        return list(self.plan.channel_names)


def build_from_plan(config: Config, plan: RunPlan) -> UNet3d:
    """The network described by a run's config and plan (untrained weights).

    With a target spacing in the plan, the topology follows it (nnU-Net's anisotropy rule);
    runs without one were built for isotropic strides and stay so.
    """
    return build_model(
        config.model,
        in_channels=len(plan.channel_names),
        out_channels=plan.out_channels,
        patch_size=plan.patch_size,
        spacing=plan.preprocessing.target_spacing,  # type: ignore[arg-type]
    )


def load_weights(model: torch.nn.Module, weights: Any, path: Path) -> None:
    """Load a checkpoint's ``model`` entry into ``model`` (strict).

    Raises:
        InputError: the weights do not fit the network (foreign or damaged checkpoint).
    """
    try:
        model.load_state_dict(weights)
    except Exception as exc:  # torch raises RuntimeError, TypeError, ... for foreign weights
        detail = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise InputError(
            f"{path}: its weights do not fit the network its config and plan describe ({detail})"
        ) from None


def model_from_checkpoint(path: Path, state: dict[str, Any]) -> tuple[Config, RunPlan, UNet3d]:
    """The config, plan and network (its weights loaded) that a loaded checkpoint describes.

    Args:
        path: the checkpoint file, named in errors.
        state: what :func:`segmenter.nn.checkpoint.load_checkpoint` returned for it.

    Raises:
        InputError: a config, plan or weights that do not make a network (one line naming
            ``path``).
    """
    try:
        config = config_from_dict(state["config"])
    except InputError as exc:
        raise InputError(f"{path}: bad config in the checkpoint ({exc})") from None
    plan = RunPlan.from_json(state["plan"], source=str(path))
    try:
        model = build_from_plan(config, plan)
    except Exception as exc:  # a foreign plan can describe no network at all
        raise InputError(f"{path}: its config and plan describe no network ({exc})") from None
    load_weights(model, state["model"], path)
    return config, plan, model


def _tuned_postprocessing(plan: RunPlan, path: Path) -> RunPlan:
    """``plan`` with the threshold and minimum lesion size of a ``postprocessing.json``."""
    try:
        post = json.loads(path.read_text())
        return plan.with_postprocessing(float(post["threshold"]), float(post["min_lesion_mm3"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable post-processing file ({exc})") from None


def load_predictor(run_dir: str | Path, *, device: str = "auto", which: str = "best") -> Predictor:
    """Load ``RUN/checkpoints/{best,last}.pt`` into an eval-mode model.

    When the run holds a ``postprocessing.json`` (written by ``segmenter crossval`` from its
    out-of-fold predictions), its threshold and minimum lesion size replace the run's own.

    Raises:
        InputError: missing run folder or checkpoint, unreadable checkpoint, or a config, plan or
            weights in it that do not make the network.
    """
    path = find_checkpoint(run_dir, which)
    dev = resolve_device(device)
    state = load_checkpoint(path, map_location=dev)
    config, plan, model = model_from_checkpoint(path, state)
    tuned = Path(run_dir) / POSTPROCESSING_FILE
    post_file = tuned if tuned.is_file() else None
    if post_file is not None:
        plan = _tuned_postprocessing(plan, post_file)
    if model.memory_format == "auto" and dev.type == "cpu":
        # 'auto' means channels-last on the CPU for training's backward pass; the no-grad
        # forward ran faster contiguous here (36 windows of 64^3 of an MS scan: 11.3 s against
        # 12.9 s; one 64^3 window 0.357 s against 0.419 s, 16 base filters, 2 AVX2 cores)
        model.memory_format = "contiguous"
    model.place(dev).eval()
    dtype = autocast_dtype(config.train.precision, dev)
    return Predictor(
        model=model,
        config=config,
        plan=plan,
        device=dev,
        dtype=dtype,
        checkpoint=path,
        postprocessing_file=post_file,
    )


def model_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders ``--model`` names: a run itself, or a cross-validation folder's
    ``fold_K`` runs (in fold order). Anything else is returned as is (loading it then fails
    with its own message)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        folds = fold_runs(p) if p.is_dir() and not (p / "checkpoints").is_dir() else []
        runs.extend(folds or [p])
    return runs


def load_predictors(paths: Sequence[str | Path], *, device: str = "auto") -> list[Predictor]:
    """One predictor per run of :func:`model_runs` (an ensemble when several)."""
    return [load_predictor(run, device=device) for run in model_runs(paths)]
