"""Device and dtype choice: CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

import ctypes
import gc
import sys

import torch

from sdbridge.errors import ConfigError

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` takes the best device present; a named device must exist."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise ConfigError(f"device {preference!r} is not a torch device (use auto, cuda, cuda:N, mps or cpu)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {preference!r} asked for, but this torch has no CUDA "
                          f"(torch {torch.__version__}); run `sdbridge doctor`")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and (mps is None or not mps.is_available()):
        raise ConfigError(f"device {preference!r} asked for, but Apple's MPS is not available here")
    return device


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """Half precision on GPUs, fp32 on the CPU (CPU half kernels are slow or missing)."""
    if preference == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        return DTYPES[preference]
    except KeyError:
        raise ConfigError(f"dtype {preference!r} not one of {sorted(DTYPES)}") from None


def return_freed_memory() -> None:
    """Collect what a closed model left in reference cycles and hand the host memory it freed back to the system.

    glibc keeps freed memory in its heaps (one per thread that allocated: models load on a loader thread), so a
    daemon's resident size grew with each model switch and never came down (QA 25: 20 switches between a 430 MB
    model and a tiny one took it from 1.1 to 3.6 GB; ``malloc_trim`` brought it back to 1.1). Elsewhere (musl,
    macOS, Windows) only the collection runs.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):  # a libc without malloc_trim (musl)
            pass
