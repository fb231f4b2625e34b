"""Where every artifact of a job lives, as keys relative to ``output.uri``."""

from __future__ import annotations

SUMMARY = "index/summary.json"
MANIFEST = "manifest.json"
MERGED = "embeddings.h5"
STATUS = "status.json"
QUARANTINE = "quarantine.json"


def shard_dir(shard: int) -> str:
    return f"shards/{shard:05d}"


def shard_input(shard: int) -> str:
    return f"{shard_dir(shard)}/input.fa"


def shard_parts(shard: int) -> str:
    return f"{shard_dir(shard)}/parts/"


def part_key(shard: int, attempt: int, start: int, count: int) -> str:
    """A part holds shard sequences [start, start+count) as written by one attempt."""
    return f"{shard_parts(shard)}{start:09d}-{count:07d}-a{attempt:04d}.npz"


def commit_key(shard: int, start: int) -> str:
    """Created exactly once per range start: the first committed writer wins."""
    return f"{shard_dir(shard)}/commits/{start:09d}.json"


def shard_progress(shard: int) -> str:
    return f"{shard_dir(shard)}/progress.json"


def shard_output(shard: int) -> str:
    return f"{shard_dir(shard)}/embeddings.h5"


def shard_done(shard: int) -> str:
    """Shard manifest: written last, so its presence means the shard is complete."""
    return f"{shard_dir(shard)}/done.json"
