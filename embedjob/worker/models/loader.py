"""Loading an ESM-2 embedder from a ModelSpec (the imperative shell around esm2.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from embedjob.spec import ModelSpec, StorageSpec
from embedjob.worker.models.esm2 import Esm2Embedder, load_esm2_encoder
from embedjob.worker.models.registry import Esm2Arch, esm2_arch, resolve_layer
from embedjob.worker.models.runtime import DTYPES
from embedjob.worker.models.weights import load_checkpoint, resolve_esm2_weights


def load_esm2(
    model: ModelSpec,
    device: torch.device,
    precision: str,
    cache_dir: Path,
    storage: StorageSpec | None = None,
) -> Esm2Embedder:
    arch = esm2_arch(model.name)
    layer = resolve_layer(model.layer, arch.layers)  # before any download: fail fast
    path = resolve_esm2_weights(model, cache_dir, storage)
    return esm2_from_checkpoint(path, arch, model, device, precision, layer=layer)


def esm2_from_checkpoint(
    path: Path,
    arch: Esm2Arch,
    model: ModelSpec,
    device: torch.device,
    precision: str,
    *,
    layer: int | None = None,
) -> Esm2Embedder:
    """An embedder from a fair-esm checkpoint file of architecture ``arch``.

    Tests pass a reduced-depth ``arch`` (a 1-layer 15B) to exercise the full-width paths.
    """
    data = load_checkpoint(path)
    return esm2_from_data(data, arch, model, device, precision, layer=layer,
                          source=model.weights or str(path))


def esm2_from_data(
    data: dict,
    arch: Esm2Arch,
    model: ModelSpec,
    device: torch.device,
    precision: str,
    *,
    layer: int | None = None,
    source: str = "checkpoint in memory",
) -> Esm2Embedder:
    """An embedder from a loaded fair-esm checkpoint dict (benchmarks skip the disk)."""
    layer = resolve_layer(model.layer, arch.layers) if layer is None else layer
    encoder = load_esm2_encoder(data, arch, layer, source, device, DTYPES[precision])
    return Esm2Embedder(
        encoder,
        name=model.name,
        pooling=model.pooling,
        long_sequences=model.long_sequences,
        max_residues=model.max_residues,
        window_overlap=model.window_overlap,
        device=device,
        precision=precision,
    )
