"""A shard's sequences on local disk: ids in memory, residues in a memory-mapped file.

Sorting by length needs every length up front, but never every residue: the residues go
to one flat file and are read back per batch, so memory grows with the number of ids only.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedjob import layout
from embedjob.alphabets import Alphabet
from embedjob.store import Store
from embedjob.worker.fasta import read_fasta


@dataclass
class ShardInput:
    ids: list[str]
    lengths: np.ndarray
    offsets: np.ndarray
    _residues: mmap.mmap | bytes

    def __len__(self) -> int:
        return len(self.ids)

    def seq(self, i: int) -> str:
        lo = int(self.offsets[i])
        return self._residues[lo : lo + int(self.lengths[i])].decode("ascii")

    def close(self) -> None:
        if isinstance(self._residues, mmap.mmap):
            self._residues.close()


def load_shard_input(store: Store, shard: int, alphabet: Alphabet, workdir: Path) -> ShardInput:
    """Stream ``shards/NNNNN/input.fa`` into ids, lengths and a residue file."""
    ids: list[str] = []
    lengths: list[int] = []
    path = workdir / "residues.bin"
    key = layout.shard_input(shard)
    with store.open_read(key) as stream, open(path, "wb") as out:
        for rec in read_fasta(stream, f"{store.uri}{key}", alphabet):
            ids.append(rec.id)
            lengths.append(len(rec.seq))
            out.write(rec.seq.encode("ascii"))
    lens = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    if path.stat().st_size == 0:
        return ShardInput(ids, lens, offsets, b"")
    with open(path, "rb") as fh:
        residues = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return ShardInput(ids, lens, offsets, residues)
