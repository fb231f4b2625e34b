"""Encoders behind one small interface: ESM-2 (our fast fair-esm-equivalent) and Hugging Face.

The worker codes against :class:`Embedder` and :func:`load_embedder` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from embedjob.spec import ModelSpec, StorageSpec
from embedjob.worker.models.testing import write_random_esm2_checkpoint

__all__ = ["Embedder", "load_embedder", "write_random_esm2_checkpoint"]


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int
    layer: int  # resolved, >= 0 (0 = the embedding layer)
    precision: str  # resolved: fp32 | fp16 | bf16
    device: torch.device

    def tokens_for(self, length: int) -> int:
        """Padded tokens a sequence of ``length`` residues costs per forward (after truncation
        or windowing): the cost :func:`embedjob.worker.batching.make_batches` budgets with."""
        ...

    def embed(self, seqs: Sequence[str]) -> np.ndarray:
        """Pooled float32 ``[n, dim]`` for validated upper-case sequences.

        Raises NumericalError on NaN/Inf, GpuOutOfMemory on CUDA OOM, CudaError on other CUDA
        runtime errors."""
        ...


def load_embedder(
    model: ModelSpec,
    *,
    device: str | None = None,
    precision: str | None = None,
    storage: StorageSpec | None = None,
    cache_dir: str | None = None,
) -> Embedder:
    """Load the encoder ``model`` names, on ``device`` (default: cuda if visible, else cpu) at
    ``precision`` (default: ``model.precision``; ``auto``: bf16/fp16 on GPUs, fp32 on CPU)."""
    from embedjob.worker.models.runtime import resolve_device, resolve_precision
    from embedjob.worker.models.weights import default_cache_dir

    dev = resolve_device(device)
    prec = resolve_precision(precision or model.precision, dev)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if model.is_esm2 or model.name.lower().startswith("esm2_"):
        from embedjob.worker.models.loader import load_esm2

        return load_esm2(model, dev, prec, cache, storage)
    from embedjob.worker.models.hf import load_hf

    return load_hf(model, dev, prec, cache, storage)
