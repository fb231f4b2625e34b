"""Hugging Face encoders (DNABERT-S and any AutoModel) from a snapshot directory or tarball.

``model.weights`` names a snapshot directory (path or file://) or a ``.tar.gz`` of one
(path, file:// or s3://; extracted once into the cache); unset, the Hugging Face cache or hub.
A model that ships its own code runs only with ``model.trustRemoteCode: true``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedjob.failures import ConfigError
from embedjob.spec import ModelSpec, StorageSpec
from embedjob.worker.batching import make_batches
from embedjob.worker.models.pooling import gather_rows, masked_mean, plan_rows
from embedjob.worker.models.registry import hf_repo_id, resolve_layer
from embedjob.worker.models.runtime import (
    CPU_FORWARD_TOKENS,
    DTYPES,
    check_finite,
    device_errors,
)
from embedjob.worker.models.weights import cached_download, local_path

_TARBALL = (".tar.gz", ".tgz", ".tar")


def resolve_snapshot(model: ModelSpec, cache_dir: Path, storage: StorageSpec | None) -> Path:
    """A local directory holding the model's config, weights and tokenizer."""
    weights = model.weights
    if weights is None:
        return _hub_snapshot(hf_repo_id(model.name))
    if weights == "random":
        raise ConfigError(
            "model.weights: random is for ESM-2 models only; give a Hugging Face snapshot"
        )
    if weights.endswith(_TARBALL):
        if weights.startswith("s3://"):
            tarball = cached_download(weights, cache_dir, storage)
        else:
            tarball = local_path(weights)
        return _extracted(tarball, weights, cache_dir)
    if weights.startswith("s3://"):
        raise ConfigError(f"model.weights {weights}: on S3, give a .tar.gz of the snapshot")
    path = local_path(weights)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.weights {weights} is not a Hugging Face snapshot directory (no config.json)"
        )
    return path


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached: try the hub unless told to stay offline
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ConfigError(
                f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: set "
                "model.weights to a snapshot directory or an s3:// .tar.gz"
            ) from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:
        raise ConfigError(
            f"cannot fetch {repo_id} from the Hugging Face hub ({type(err).__name__}): set "
            "model.weights to a snapshot directory or an s3:// .tar.gz"
        ) from None


def _extracted(tarball: Path, uri: str, cache_dir: Path) -> Path:
    """Extract once into the cache (tar's 'data' filter: no links out, no absolute paths)."""
    if not tarball.is_file():
        raise ConfigError(f"model.weights {uri} does not exist")
    target = cache_dir / "hf" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(tmp, target)
        except (tarfile.TarError, OSError) as err:
            raise ConfigError(f"cannot extract model.weights {uri}: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _snapshot_root(target, uri)


def _snapshot_root(root: Path, uri: str) -> Path:
    """The directory with config.json: the root or its one top-level folder."""
    if (root / "config.json").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if len(found) != 1:
        raise ConfigError(f"model.weights {uri}: no single Hugging Face snapshot (config.json)")
    return found[0]


def _needs_remote_code(snapshot: Path) -> bool:
    try:
        config = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {snapshot / 'config.json'}: {err}") from None
    return bool(config.get("auto_map"))


class HfEmbedder:
    """The ``Embedder`` for Hugging Face encoders: mean over non-special tokens, or CLS."""

    before_forward: Callable[[], None] | None = None
    """Run before every forward pass (the worker's heartbeat and stop check)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        spec: ModelSpec,
        layer: int,
        last: bool,
        device: torch.device,
        precision: str,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = spec.name
        self.dim = int(model.config.hidden_size)
        self.layer = layer
        self._last = last
        self.spec = spec
        self.device = device
        self.precision = precision
        limits = [
            getattr(model.config, "max_position_embeddings", None),
            getattr(tokenizer, "model_max_length", None),
        ]
        self.max_length = min(int(x) for x in limits if x and x < 10**9) if any(limits) else None
        self.forward_tokens = CPU_FORWARD_TOKENS if device.type == "cpu" else None

    def _row_cost(self, chars: int) -> int:
        # characters + 2 specials bound the tokens of char, k-mer and BPE tokenizers alike
        cost = chars + 2
        return min(cost, self.max_length) if self.max_length else cost

    def tokens_for(self, length: int) -> int:
        s = self.spec
        rows = plan_rows([length], s.long_sequences, s.max_residues, s.window_overlap)
        return sum(self._row_cost(e - b) for _, b, e in rows)

    def embed(self, seqs: Sequence[str]) -> np.ndarray:
        if not seqs:
            return np.empty((0, self.dim), dtype=np.float32)
        s = self.spec
        rows = plan_rows([len(x) for x in seqs], s.long_sequences, s.max_residues, s.window_overlap)
        pooled = np.empty((len(rows), self.dim), dtype=np.float32)
        costs = [self._row_cost(e - b) for _, b, e in rows]
        budget = self.forward_tokens or max(costs) * len(costs)
        for chunk in make_batches(costs, budget):
            if self.before_forward is not None:
                self.before_forward()
            pooled[chunk] = self._forward(
                [seqs[rows[r][0]][rows[r][1] : rows[r][2]] for r in chunk]
            )
        check_finite(pooled, self.precision)
        return gather_rows(pooled, rows, len(seqs))

    def _forward(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        ids = enc["input_ids"].to(self.device)
        attention = enc["attention_mask"].to(self.device)
        keep = attention.bool() & ~enc["special_tokens_mask"].to(self.device).bool()
        with device_errors(self.device, ids.numel()), torch.inference_mode():
            # remote-code models (DNABERT-S) may not take output_hidden_states: ask only if needed
            extra = {} if self._last else {"output_hidden_states": True}
            out = self.model(input_ids=ids, attention_mask=attention, **extra)
            hidden = _hidden(out, self.layer, self._last)
            if self.spec.pooling == "cls":
                return hidden[:, 0].float().cpu().numpy()
            return masked_mean(hidden, keep).cpu().numpy()


def _hidden(out: Any, layer: int, last: bool) -> torch.Tensor:
    if last:
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    states = getattr(out, "hidden_states", None)
    if states is None:
        raise ConfigError("this model does not return hidden states: use model.layer: -1")
    return states[layer]


def _dtype_kwarg(precision: str) -> dict[str, torch.dtype]:
    """transformers >= 4.56 calls it ``dtype``; older releases only know ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: DTYPES[precision]}


def load_hf(
    model: ModelSpec,
    device: torch.device,
    precision: str,
    cache_dir: Path,
    storage: StorageSpec | None = None,
) -> HfEmbedder:
    snapshot = resolve_snapshot(model, cache_dir, storage)
    if _needs_remote_code(snapshot) and not model.trust_remote_code:
        raise ConfigError(
            f"{model.name} ships its own model code: set model.trustRemoteCode: true to run it"
        )
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    trust = model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(snapshot, trust_remote_code=trust)
        layers = int(getattr(config, "num_hidden_layers", 0))
        layer = resolve_layer(model.layer, layers)
        tokenizer = AutoTokenizer.from_pretrained(snapshot, trust_remote_code=trust)
        net = AutoModel.from_pretrained(
            snapshot, config=config, trust_remote_code=trust, **_dtype_kwarg(precision)
        )
    except ConfigError:
        raise
    except Exception as err:  # transformers raises many types for a bad snapshot
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load {model.name} from {snapshot}: {first}") from None
    net = net.to(device).eval()
    return HfEmbedder(
        net,
        tokenizer,
        spec=model,
        layer=layer,
        last=layer == layers,
        device=device,
        precision=precision,
    )
