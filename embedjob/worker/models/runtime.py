"""Device, precision and error translation shared by the encoders."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from embedjob.failures import ConfigError, CudaError, GpuOutOfMemory, NumericalError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_FORWARD_TOKENS = 4096
"""Padded tokens per forward pass on CPU: measured fastest on CPU (bench/README.md); larger
batches only add cache misses. On GPUs a batch runs as one forward pass."""


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but no CUDA GPU is visible")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if precision != "auto":
        if precision not in DTYPES:
            raise ConfigError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@contextmanager
def device_errors(device: torch.device, tokens: int) -> Iterator[None]:
    """Turn CUDA failures into the worker's failure types (one line each)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise GpuOutOfMemory(
            f"GPU out of memory on a batch of {tokens} padded tokens: lower model.maxTokensPerBatch"
        ) from None
    except RuntimeError as err:
        text = str(err)
        accel = getattr(torch, "AcceleratorError", ())
        if device.type == "cuda" and (isinstance(err, accel) or "CUDA" in text):
            first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            raise CudaError(f"CUDA error: {first}") from None
        raise


def check_finite(pooled: np.ndarray, precision: str) -> None:
    if not np.isfinite(pooled).all():
        bad = int((~np.isfinite(pooled)).any(axis=1).sum())
        raise NumericalError(
            f"NaN/Inf in {bad} embedding(s) at {precision}: run at a safer precision "
            "(model.precision: bf16 or fp32)", precision=precision,
        )
