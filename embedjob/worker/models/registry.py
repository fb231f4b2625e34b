"""What the project knows about each model by name (pure data)."""

from __future__ import annotations

from dataclasses import dataclass

from embedjob.failures import ConfigError


@dataclass(frozen=True)
class Esm2Arch:
    """An ESM-2 architecture as fair-esm builds it."""

    name: str
    layers: int
    dim: int
    heads: int

    @property
    def ffn_dim(self) -> int:
        return 4 * self.dim


ESM2_ARCHS: dict[str, Esm2Arch] = {
    a.name: a
    for a in (
        Esm2Arch("esm2_t6_8M_UR50D", 6, 320, 20),
        Esm2Arch("esm2_t12_35M_UR50D", 12, 480, 20),
        Esm2Arch("esm2_t30_150M_UR50D", 30, 640, 20),
        Esm2Arch("esm2_t33_650M_UR50D", 33, 1280, 20),
        Esm2Arch("esm2_t36_3B_UR50D", 36, 2560, 40),
        Esm2Arch("esm2_t48_15B_UR50D", 48, 5120, 40),
    )
}

HF_ALIASES: dict[str, str] = {"dnabert-s": "zhihan1996/DNABERT-S"}
"""Short names for Hugging Face encoders the project documents."""


def esm2_arch(name: str) -> Esm2Arch:
    try:
        return ESM2_ARCHS[name]
    except KeyError:
        known = ", ".join(ESM2_ARCHS)
        raise ConfigError(f"unknown ESM-2 model {name!r}: use one of {known}") from None


def resolve_layer(layer: int, num_layers: int) -> int:
    """Map ``model.layer`` to 0..num_layers (0 = embeddings); negative counts from the last."""
    resolved = num_layers + 1 + layer if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise ConfigError(
            f"model.layer {layer} is out of range for a {num_layers}-layer model: "
            f"use 0..{num_layers} or -1..-{num_layers + 1}"
        )
    return resolved


def hf_repo_id(name: str) -> str:
    return HF_ALIASES.get(name.lower(), name)
