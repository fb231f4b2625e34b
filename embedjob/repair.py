"""Honest completion: a shard counts as done only while its file matches its done record.

``done.json`` records the size and sha256 of the shard file its worker published. Files can
be deleted, truncated or bit-flipped afterwards; :func:`damaged_shards` finds those (sizes at
once, checksums when asked), :func:`reset_shards` removes their done records and files (and
the manifest that listed them) so that the next run embeds exactly those shards again.
Damaged HDF5 files surface as one line (:class:`DamagedOutput`), never an h5py traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedjob import layout
from embedjob.failures import StorageError
from embedjob.store import FileStore, ObjectNotFound, S3Store, Store

RERUN = "run the job again (embedjob run, or re-apply it) to re-embed it"


class DamagedOutput(StorageError):
    """An output file does not match its record, or is not readable HDF5."""


def object_size(store: Store, key: str) -> int | None:
    """The size of ``key`` in bytes, or None when it does not exist."""
    if isinstance(store, FileStore):
        path = store.root / key
        return path.stat().st_size if path.is_file() else None
    if isinstance(store, S3Store):
        full = store.prefix + key
        head = store._call("read", full, lambda: store._head(full))  # one HEAD, errors mapped
        return None if head is None else int(head.get("ContentLength", 0))
    return len(store.read_bytes(key)) if store.exists(key) else None


def sha256_of(store: Store, key: str) -> tuple[str, int]:
    """(sha256, size) of a stored object, streamed."""
    digest, size = hashlib.sha256(), 0
    with store.open_read(key) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def read_done(store: Store, shard: int) -> dict[str, Any] | None:
    """The shard's done record; None when the shard is not finished."""
    try:
        record = json.loads(store.read_bytes(layout.shard_done(shard)))
    except ObjectNotFound:
        return None
    except ValueError:
        return {}  # unreadable: the shard cannot be trusted
    return record if isinstance(record, dict) else {}


def shard_problem(store: Store, shard: int, done: dict[str, Any], *, verify: bool) -> str | None:
    """What is wrong with a finished shard's file (None: it matches its done record)."""
    key = layout.shard_output(shard)
    if "sha256" not in done:
        return f"shard {shard}: its done record is unreadable"
    size = object_size(store, key)
    if size is None:
        return f"shard {shard}: {key} is missing"
    if done.get("bytes") is not None and size != int(done["bytes"]):
        return f"shard {shard}: {key} is {size} bytes, its done record says {done['bytes']}"
    if verify:
        sha, _ = sha256_of(store, key)
        if sha != done["sha256"]:
            return f"shard {shard}: {key} sha256 {sha[:12]}… does not match its done record"
    return None


def damaged_shards(store: Store, shards: int, *, verify: bool = False) -> list[tuple[int, str]]:
    """Finished shards whose files are missing or damaged, with the problem in words: sizes
    against the done records at once, checksums too with ``verify``."""
    found = []
    for shard in range(shards):
        done = read_done(store, shard)
        if done is not None and (problem := shard_problem(store, shard, done, verify=verify)):
            found.append((shard, problem))
    return found


def reset_shards(store: Store, shards: list[int]) -> None:
    """Forget damaged shards so the next run embeds them again: the manifest that listed
    them goes first (the output is no longer complete), then each done record, then the file."""
    if not shards:
        return
    store.delete(layout.MANIFEST)
    store.delete(layout.MERGED)
    for shard in shards:
        store.delete(layout.shard_done(shard))
        store.delete(layout.shard_output(shard))


def check_and_reset(store: Store, shards: int, *, verify: bool = False) -> list[str]:
    """``embedjob run`` on an existing output: reset damaged shards; one line for each."""
    damaged = damaged_shards(store, shards, verify=verify)
    reset_shards(store, [shard for shard, _ in damaged])
    return [f"{problem}: re-embedding it" for _, problem in damaged]


@contextlib.contextmanager
def h5_errors(what: str) -> Iterator[None]:
    """h5py's errors on a truncated or damaged file, as one line naming the file and the fix."""
    try:
        yield
    except (OSError, KeyError) as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DamagedOutput(
            f"{what} is not a readable embedjob HDF5 file ({reason}) — it is damaged or "
            f"truncated: {RERUN}"
        ) from None


def open_h5(path: str | Path, what: str) -> Any:
    """``h5py.File(path, "r")`` with damage reported by :func:`h5_errors`."""
    import h5py

    with h5_errors(what):
        return h5py.File(path, "r")
