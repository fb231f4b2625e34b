"""Assemble a shard's ``embeddings.h5`` from its committed parts, streaming.

Rows are scattered into a disk-backed memmap (one part in memory at a time), then copied
into HDF5 in blocks, so memory stays flat in the shard's size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from embedjob import layout
from embedjob.failures import StorageError
from embedjob.store import Store
from embedjob.worker.checkpoint import Committed, decode_part

BLOCK_ROWS = 4096


def scatter_parts(
    store: Store, shard: int, committed: Committed, rows: int, dim: int, dtype: str, path: Path
) -> np.ndarray:
    """Write every committed row at its position in a memmap; return the memmap."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, dim))
    filled = np.zeros(rows, dtype=bool)
    for rec in committed.parts:
        part = decode_part(store.read_bytes(layout.part_key(shard, rec.name)))
        fresh = ~filled[part.positions]
        out[part.positions[fresh]] = part.embeddings[fresh]
        filled[part.positions[fresh]] = True
    return out


def write_h5(
    path: Path,
    ids: Sequence[str],
    rows: np.ndarray,
    source: np.ndarray,
    attrs: Mapping[str, object],
) -> None:
    """Write ``ids[rows]`` and ``source[rows]`` to an HDF5 file in blocks."""
    n, dim = len(rows), source.shape[1]
    with h5py.File(path, "w", track_order=True) as h5:
        h5.create_dataset("ids", data=[ids[i] for i in rows.tolist()],
                          dtype=h5py.string_dtype("utf-8"))
        chunk = (max(1, min(n, 1024)), dim)
        emb = h5.create_dataset("embeddings", shape=(n, dim), dtype=source.dtype,
                                chunks=chunk if n else None)
        for lo in range(0, n, BLOCK_ROWS):
            emb[lo : lo + BLOCK_ROWS] = source[rows[lo : lo + BLOCK_ROWS]]
        for key, value in attrs.items():
            h5.attrs[key] = value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_shard(
    store: Store,
    shard: int,
    ids: Sequence[str],
    committed: Committed,
    keep: np.ndarray,
    *,
    dim: int,
    dtype: str,
    attrs: Mapping[str, object],
    workdir: Path,
) -> Path:
    """Build the shard file locally from parts; ``keep`` marks the rows to output."""
    missing = keep & ~committed.done
    if missing.any():
        raise StorageError(f"shard {shard}: {int(missing.sum())} sequences have no committed part")
    scratch = workdir / "rows.npy"
    source = scatter_parts(store, shard, committed, len(ids), dim, dtype, scratch)
    path = workdir / "embeddings.h5"
    write_h5(path, ids, np.flatnonzero(keep), source, attrs)
    del source
    os.unlink(scratch)
    return path
