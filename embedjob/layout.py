"""Where every artifact of a job lives, as keys relative to ``output.uri``."""

from __future__ import annotations

SUMMARY = "index/summary.json"
MANIFEST = "manifest.json"
MERGED = "embeddings.h5"
STATUS = "status.json"
QUARANTINE = "quarantine.json"
TRUNCATED = "index/truncated.json"
"""Ids of the sequences longer than model.maxResidues that are embedded truncated."""


def shard_dir(shard: int) -> str:
    return f"shards/{shard:05d}"


def shard_input(shard: int) -> str:
    return f"{shard_dir(shard)}/input.fa"


def shard_parts(shard: int) -> str:
    return f"{shard_dir(shard)}/parts/"


def part_name(attempt: int, index: int) -> str:
    """Parts are named per attempt, so concurrent attempts never write the same key."""
    return f"a{attempt:04d}-{index:06d}"


def part_key(shard: int, name: str) -> str:
    return f"{shard_parts(shard)}{name}.npz"


def shard_commits(shard: int) -> str:
    return f"{shard_dir(shard)}/commits/"


def commit_key(shard: int, name: str) -> str:
    """Written after the part's upload: a part without one does not count."""
    return f"{shard_commits(shard)}{name}.json"


def shard_progress(shard: int) -> str:
    return f"{shard_dir(shard)}/progress.json"


HEARTBEATS = "heartbeats/"
"""Every shard's heartbeat under one flat prefix: one LIST shows 1,000 of them, ETags included."""


def shard_heartbeat(shard: int) -> str:
    """Liveness: written by a running attempt after forward passes, at a bounded rate."""
    return f"{HEARTBEATS}{shard:05d}.json"


def heartbeat_shard(key: str) -> int | None:
    """The shard whose heartbeat ``key`` (as listed under :data:`HEARTBEATS`) is, else None."""
    name = key.removeprefix(HEARTBEATS).removesuffix(".json")
    return int(name) if name.isdigit() and key.startswith(HEARTBEATS) else None


def shard_output(shard: int) -> str:
    return f"{shard_dir(shard)}/embeddings.h5"


def shard_done(shard: int) -> str:
    """Shard manifest: written last, so its presence means the shard is complete."""
    return f"{shard_dir(shard)}/done.json"
