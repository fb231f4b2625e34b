"""Where weights come from, and loading fair-esm checkpoints safely.

``model.weights`` is a path, ``file://``, ``s3://`` (downloaded once into the cache), the
literal ``random`` (a seeded random checkpoint written into the cache, then loaded like any
other), or unset (fair-esm's torch hub cache, which honours ``TORCH_HOME``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from embedjob.failures import ConfigError
from embedjob.spec import RANDOM_WEIGHTS, ModelSpec, StorageSpec
from embedjob.worker.models.registry import Esm2Arch

_PREFIXES = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def _numpy_scalar_globals() -> list[object]:
    # numpy scalars (a learning rate, a seed) can sit in a training config; they are data
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed it
    scalar = core.multiarray.scalar
    kinds = ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
    return [scalar, np.dtype, *(getattr(np.dtypes, k) for k in kinds)]


# fair-esm pickles its model config as an argparse.Namespace next to the tensors (torch >= 2.6
# refuses it under weights_only=True). Only that and plain numpy scalars are allowed in:
# no callable, no class that runs code on unpickling.
SAFE_GLOBALS = [argparse.Namespace, *_numpy_scalar_globals()]


def default_cache_dir() -> Path:
    return Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob"))


def hub_checkpoint(name: str) -> Path:
    """Where fair-esm's ``torch.hub`` download of ``name`` lives."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri).expanduser()


def cached_download(uri: str, cache_dir: Path, storage: StorageSpec | None) -> Path:
    """Download ``uri`` once into ``cache_dir`` (atomic rename; reused on restart)."""
    from embedjob.store import open_uri  # the store pulls in boto3: only when needed

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_dir / "downloads" / f"{digest}-{Path(urlparse(uri).path).name}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out, open_uri(uri, storage) as src:
            shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def resolve_esm2_weights(
    model: ModelSpec, cache_dir: Path, storage: StorageSpec | None = None
) -> Path:
    """A local fair-esm checkpoint file for ``model`` (downloading or generating it)."""
    weights = model.weights
    if weights == RANDOM_WEIGHTS:
        from embedjob.worker.models.testing import write_random_esm2_checkpoint

        path = cache_dir / "random" / f"{model.name}-seed0.pt"
        if not path.exists():
            write_random_esm2_checkpoint(model.name, str(path))
        return path
    if weights is None:
        path = hub_checkpoint(model.name)
        if not path.exists():
            raise ConfigError(
                f"no weights for {model.name}: {path} is absent and the model hub is out of "
                "reach; set model.weights to a fair-esm .pt checkpoint (path or s3://), "
                "or 'random' for a smoke test"
            )
        return path
    if weights.startswith("s3://"):
        return cached_download(weights, cache_dir, storage)
    if "://" in weights and not weights.startswith("file://"):
        raise ConfigError(f"model.weights {weights!r}: use a path, file://, s3:// or 'random'")
    path = local_path(weights)
    if not path.is_file():
        raise ConfigError(f"model.weights {weights} does not exist or is not a file")
    return path


def load_checkpoint(path: Path) -> dict:
    """``torch.load`` with ``weights_only=True`` and fair-esm's config class allowed."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:  # mmap keeps a 15B checkpoint from being held twice in host memory
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be mapped
                data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"cannot load weights {path}: {_why(err)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path} is not a fair-esm checkpoint (no 'model' state dict)")
    return data


def _why(err: Exception) -> str:
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (
            f"it pickles {found.group(1)}, which fair-esm checkpoints do not contain "
            "(refused for safety); re-save the state dict or use the original file"
        )
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def esm2_state_dict(data: dict) -> dict[str, torch.Tensor]:
    """The model's tensors with fair-esm's ``encoder.`` prefixes removed."""
    return {_PREFIXES.sub("", k): v for k, v in data["model"].items()}


def check_esm2_state(
    state: dict[str, torch.Tensor], arch: Esm2Arch, source: str, cfg: object = None
) -> None:
    """ConfigError unless the tensors are ``arch``: layers, width and heads."""
    layers = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    found_layers = max(layers) + 1 if layers else 0
    emb = state.get("embed_tokens.weight")
    found_dim = int(emb.shape[1]) if emb is not None and emb.dim() == 2 else None
    if (found_layers, found_dim) != (arch.layers, arch.dim):
        raise ConfigError(
            f"weights {source} do not match {arch.name}: found {found_layers} layers, dim "
            f"{found_dim}; expected {arch.layers} layers, dim {arch.dim} "
            "(check model.name and model.weights)"
        )
    heads = getattr(cfg, "encoder_attention_heads", arch.heads)
    if heads != arch.heads:
        raise ConfigError(
            f"weights {source} have {heads} attention heads; {arch.name} has {arch.heads}"
        )
    missing = [k for k in _required_keys(arch.layers) if k not in state]
    if missing:
        raise ConfigError(
            f"weights {source} lack {len(missing)} tensors of {arch.name}, "
            f"e.g. {missing[0]}: the file is incomplete or another model"
        )


def _required_keys(layers: int) -> list[str]:
    per_layer = [
        f"self_attn.{n}_proj.{k}" for n in ("q", "k", "v", "out") for k in ("weight", "bias")
    ] + [
        f"{n}.{k}"
        for n in ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2")
        for k in ("weight", "bias")
    ]
    keys = ["embed_tokens.weight", "emb_layer_norm_after.weight", "emb_layer_norm_after.bias"]
    return keys + [f"layers.{i}.{k}" for i in range(layers) for k in per_layer]
