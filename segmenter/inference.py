"""Sliding-window inference with mirroring test-time augmentation.

The network sees the training preprocessing (crop to nonzero, per-channel z-score inside the
nonzero mask); its logits are combined over overlapping windows with Gaussian weights (MONAI's
``sliding_window_inference``, nnU-Net's sigma of 1/8 of the window) and, with TTA, averaged over
the 8 mirrorings of the three axes (nnU-Net). Probabilities are put back into the scan's own grid
(uncropped) before thresholding, so masks overlay the input exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segmenter.checkpoint import find_checkpoint, load_checkpoint
from segmenter.config import Config, InferenceConfig, config_from_dict
from segmenter.errors import InputError
from segmenter.model import UNet3d, build_model
from segmenter.run_plan import RunPlan
from segmenter.splits import fold_runs

MIRROR_AXES: tuple[tuple[int, ...], ...] = tuple(
    axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)
)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{name}' requested but no CUDA GPU is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InputError(f"unknown device '{name}' (use cpu, cuda or auto)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None: float32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    # auto: fp16 on CUDA; bf16 on CPUs with native bf16 matmul support, else fp32
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else None


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``dtype``, or nothing for float32."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def sliding_window_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: tuple[int, int, int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits of a whole volume.

    Args:
        model: network in eval mode returning ``(B, K, x, y, z)`` logits.
        image: ``(1, C, X, Y, Z)`` float, preprocessed, on the model's device.
        patch_size: window size (the training patch).
        overlap: window overlap fraction (0.5 as nnU-Net).
        sw_batch_size: windows per forward pass.
        dtype: autocast dtype or None for float32.

    Returns:
        ``(1, K, X, Y, Z)`` float32 logits.
    """
    from monai.inferers import sliding_window_inference

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(image.device, dtype):
            return model(x).float()

    out = sliding_window_inference(
        image,
        roi_size=patch_size,
        sw_batch_size=sw_batch_size,
        predictor=forward,
        overlap=overlap,
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
    )
    return torch.as_tensor(out).float()


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    cfg: InferenceConfig,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tta: bool | None = None,
) -> np.ndarray:
    """Logits of a preprocessed volume, averaged over mirrorings when TTA is on.

    Args:
        model: network in eval mode.
        image: ``(C, X, Y, Z)`` float32 preprocessed image.
        patch_size: window size.
        cfg: overlap, windows per batch, TTA default.
        device: where to run.
        dtype: autocast dtype or None.
        tta: override ``cfg.tta``.

    Returns:
        ``(K, X, Y, Z)`` float32 logits (K output channels of the model).
    """
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None].to(device)  # a writable copy
    mirrors = MIRROR_AXES if (cfg.tta if tta is None else tta) else ((),)
    total: torch.Tensor | None = None
    for axes in mirrors:
        xi = torch.flip(x, axes) if axes else x
        logits = sliding_window_logits(
            model, xi, patch_size, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
            dtype=dtype,
        )  # fmt: skip
        if axes:
            logits = torch.flip(logits, axes)
        total = logits if total is None else total + logits
    assert total is not None
    return (total / len(mirrors))[0].cpu().numpy()


def foreground_probability(logits: np.ndarray, activation: str) -> np.ndarray:
    """Foreground probability ``(X, Y, Z)`` float32 from ``(K, X, Y, Z)`` logits.

    Sigmoid models have one channel per foreground class; softmax models have the background in
    channel 0. With several foreground classes, the foreground probability is the largest
    class probability (sigmoid) or one minus the background's (softmax).
    """
    t = torch.from_numpy(logits)
    if activation == "sigmoid":
        prob = torch.sigmoid(t).amax(dim=0)
    else:
        prob = 1.0 - torch.softmax(t, dim=0)[0]
    return prob.numpy().astype(np.float32)


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
        InputError: missing run folder or checkpoint, unreadable checkpoint or plan.
    """
    path = find_checkpoint(run_dir, which)
    dev = resolve_device(device)
    state = load_checkpoint(path, map_location=dev)
    config = config_from_dict(state["config"])
    plan = RunPlan.from_json(state["plan"], source=str(path))
    tuned = Path(run_dir) / POSTPROCESSING_FILE
    post_file = tuned if tuned.is_file() else None
    if post_file is not None:
        plan = _tuned_postprocessing(plan, post_file)
    model = build_from_plan(config, plan)
    model.load_state_dict(state["model"])
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
