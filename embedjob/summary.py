"""``index/summary.json``: the shard plan and what it was made from.

Kept free of numpy and torch: the operator reads it too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from embedjob import layout
from embedjob.failures import ConfigError
from embedjob.store import ObjectNotFound, Store

SUMMARY_VERSION = 1


@dataclass(frozen=True)
class IndexSummary:
    """What ``index/summary.json`` holds: the shard plan and what it was made from."""

    shards: int  # effective: min(requested shards, sequences)
    sequences: int
    residues: int
    fingerprint: str  # sha256 over the normalised records (id, upper-case sequence)
    model: str
    alphabet: str
    inputs: tuple[str, ...]
    shard_sequences: tuple[int, ...]
    shard_residues: tuple[int, ...]
    max_length: int
    requested_shards: int
    layer: int = -1
    pooling: str = "mean"
    long_sequences: str = "truncate"
    max_residues: int = 1022
    window_overlap: int = 0
    dtype: str = "float32"
    weights: str = ""  # what the weights are (embedjob.weights_id); "" in older indexes
    truncated: int = 0  # sequences longer than max_residues, embedded truncated (ids: TRUNCATED)
    version: int = SUMMARY_VERSION

    def settings(self) -> dict[str, Any]:
        """What must match for an existing output to be this job's."""
        return {
            "model": self.model,
            "layer": self.layer,
            "pooling": self.pooling,
            "alphabet": self.alphabet,
            "shards": self.requested_shards,
            "longSequences": self.long_sequences,
            "maxResidues": self.max_residues,
            "windowOverlap": self.window_overlap if self.long_sequences == "window" else 0,
            "dtype": self.dtype,
            "weights": self.weights,
        }

    def to_json(self) -> bytes:
        data = asdict(self)
        order = ["version", "shards", "sequences", "residues", "fingerprint", "model"]
        ordered = {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}
        return (json.dumps(ordered, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> IndexSummary:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != SUMMARY_VERSION:
            raise ValueError(f"unsupported summary version {data.get('version')!r}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for name in ("inputs", "shard_sequences", "shard_residues"):
            known[name] = tuple(known.get(name, ()))
        known.setdefault("requested_shards", known.get("shards", 1))
        return cls(**known)


def load_summary(out: Store) -> IndexSummary | None:
    """The output's index summary, or None before the index step has finished."""
    try:
        text = out.read_bytes(layout.SUMMARY)
    except ObjectNotFound:
        return None
    try:
        return IndexSummary.from_json(text)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(
            f"{out.uri}{layout.SUMMARY} is unreadable ({err}): delete it to re-index, or "
            "choose a new output.uri"
        ) from None
