"""Checkpoints: everything ``predict`` and ``--resume`` need, loadable with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled objects),
so ``torch.load(path, weights_only=True)`` reads it safely:

- ``format``: format version; ``model``: the network's ``state_dict``;
- ``optimizer``, ``scheduler``: their ``state_dict`` (for ``--resume``);
- ``epoch`` (completed epochs), ``step`` (optimiser steps), ``best_metric``, ``best_epoch``;
- ``config``: the resolved config as a plain dict; ``plan``: patch size, channels, the label map,
  normalisation and preprocessing facts predict must repeat;
- ``rng``: torch RNG state, so a resumed run continues exactly;
- ``epoch_progress`` (from a mid-epoch stop; absent at an epoch boundary and in older runs): the
  steps done in the unfinished epoch and their losses
  (:class:`segmenter.training.state.EpochProgress`);
- ``world_size`` (absent in older runs: 1): the processes that trained together (``torchrun``,
  :mod:`segmenter.nn.distributed`); ``--resume`` needs as many.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segmenter.atomic import atomic_path
from segmenter.errors import InputError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "model", "config", "plan", "epoch", "step")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temporary file, then rename).

    Args:
        path: destination ``.pt`` file; parent folders are created.
        state: plain dict as described in the module docstring (``format`` is filled in).
    """
    missing = [k for k in REQUIRED_KEYS if k != "format" and k not in state]
    if missing:
        raise ValueError(f"checkpoint state misses {', '.join(missing)}")
    payload = {"format": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _why_unreadable(exc: Exception) -> str:
    """torch's reason a file did not load, in a few words."""
    text = str(exc)
    if "Weights only load failed" in text:
        return (
            "it holds pickled objects, and loading them could run code: refused, not loaded; "
            "a segmenter checkpoint holds only tensors and plain values"
        )
    if "central directory" in text or "zip archive" in text:
        return "not a complete torch zip file: truncated or another format"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:160] if lines else repr(exc)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        InputError: missing, unreadable or foreign file (one line naming it).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise InputError(f"{p}: cannot read checkpoint ({_why_unreadable(exc)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise InputError(f"{p}: not a segmenter checkpoint (missing keys)")
    if state["format"] != FORMAT_VERSION:
        raise InputError(f"{p}: checkpoint format {state['format']}, expected {FORMAT_VERSION}")
    return state


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """``RUN/checkpoints/{which}.pt``, falling back from best to last.

    Raises:
        InputError: the run folder or its checkpoints are missing.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: run folder not found")
    for name in (which, "last") if which == "best" else (which,):
        candidate = run / "checkpoints" / f"{name}.pt"
        if candidate.is_file():
            return candidate
    raise InputError(f"{run}: no checkpoint in {run / 'checkpoints'} (train a model first)")
