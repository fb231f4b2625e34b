"""Random-initialised checkpoints of the real architectures, in fair-esm's format.

``model.weights: random`` and the tests write these and load them through the same path as
downloaded checkpoints. Weights are drawn at a scale where every layer changes the output
(a test comparing with fair-esm can then fail for a wrong layer, norm or rotation).
"""

from __future__ import annotations

import math
import os
import tempfile
from argparse import Namespace
from pathlib import Path

import torch

from embedjob.worker.models.registry import esm2_arch

_PREFIX = "encoder.sentence_encoder."
VOCAB = 33


def random_esm2_state(name: str, *, num_layers: int | None = None, seed: int = 0) -> dict:
    """fair-esm ESM-2 state dict (un-prefixed keys) with seeded random weights."""
    arch = esm2_arch(name)
    layers = arch.layers if num_layers is None else num_layers
    d, f = arch.dim, arch.ffn_dim
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    def linear(prefix: str, fan_out: int, fan_in: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": normal(fan_out, fan_in, std=1 / math.sqrt(fan_in)),
            f"{prefix}.bias": normal(fan_out, std=0.02),
        }

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": normal(d, std=0.1, mean=1.0),
            f"{prefix}.bias": normal(d, std=0.1),
        }

    head_dim = d // arch.heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    embed = normal(VOCAB, d, std=1.0)
    state: dict[str, torch.Tensor] = {"embed_tokens.weight": embed}
    for i in range(layers):
        p = f"layers.{i}."
        for n in ("k", "v", "q", "out"):
            state.update(linear(f"{p}self_attn.{n}_proj", d, d))
        state[f"{p}self_attn.rot_emb.inv_freq"] = inv_freq.clone()
        state.update(norm(f"{p}self_attn_layer_norm"))
        state.update(linear(f"{p}fc1", f, d))
        state.update(linear(f"{p}fc2", d, f))
        state.update(norm(f"{p}final_layer_norm"))
    state.update(norm("emb_layer_norm_after"))
    state["lm_head.weight"] = embed  # tied, as in fair-esm
    state["lm_head.bias"] = torch.zeros(VOCAB)
    state.update(linear("lm_head.dense", d, d))
    state.update(norm("lm_head.layer_norm"))
    return {"layers": layers, "arch": arch, "state": state}


def random_esm2_checkpoint(name: str, *, num_layers: int | None = None, seed: int = 0) -> dict:
    """A fair-esm-format checkpoint (``{"model", "cfg", "args"}``) in memory."""
    made = random_esm2_state(name, num_layers=num_layers, seed=seed)
    arch = made["arch"]
    cfg = Namespace(
        encoder_layers=made["layers"],
        encoder_embed_dim=arch.dim,
        encoder_ffn_embed_dim=arch.ffn_dim,
        encoder_attention_heads=arch.heads,
        token_dropout=True,
    )
    data = {
        "model": {_PREFIX + k: v for k, v in made["state"].items()},
        "cfg": {"model": cfg},
        "args": None,
    }
    return data


def write_random_esm2_checkpoint(
    name: str, path: str, *, num_layers: int | None = None, seed: int = 0
) -> None:
    """Write a fair-esm-format checkpoint (``{"model", "cfg", "args"}``) to ``path``, atomically."""
    data = random_esm2_checkpoint(name, num_layers=num_layers, seed=seed)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
