"""Device and precision: which device a setting means and which autocast dtype runs on it.

- :func:`resolve_device`: ``auto`` is CUDA when there is a GPU, else the CPU;
- :func:`autocast_dtype`: ``auto`` is fp16 on CUDA, bf16 on CPUs with native bf16 matmuls
  (AVX512-BF16 or AMX), float32 elsewhere;
- :func:`autocast`: ``torch.autocast`` for that dtype, or nothing for float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from segmenter.errors import InputError


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
