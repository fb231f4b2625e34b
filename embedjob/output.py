"""Reading a job's output: ``embedjob.open(uri)`` gives every shard as one collection.

Shard files are opened lazily (downloaded to a local cache first when the output is on S3);
lookup by id builds an index of ids only, never of embeddings.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedjob import layout
from embedjob.failures import ConfigError
from embedjob.repair import RERUN, DamagedOutput, h5_errors, open_h5
from embedjob.spec import StorageSpec
from embedjob.store import FileStore, Store, local_path, open_store


def read_manifest(store: Store) -> dict[str, Any]:
    if not store.exists(layout.MANIFEST):
        raise ConfigError(
            f"no manifest.json in {store.uri}: the job has not finished (see status.json)"
        )
    return json.loads(store.read_bytes(layout.MANIFEST))


class Embeddings:
    """A finished job's embeddings: ``len``, ``ids``, ``emb[id]``, batches, ``to_numpy()``."""

    def __init__(self, store: Store, cache_dir: str | None = None) -> None:
        import h5py  # the reader needs the worker extra; the operator never imports this

        self._h5py = h5py
        self.store = store
        self.manifest = read_manifest(store)
        self._shards = self.manifest["shards"]
        self._starts = np.cumsum([0] + [s["count"] for s in self._shards]).tolist()
        self._files: dict[int, Any] = {}
        self._index: dict[str, int] | None = None
        self._own_cache = cache_dir is None
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="embedjob-read-"))

    # --- metadata
    def __len__(self) -> int:
        return int(self.manifest["sequences"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    def _file(self, k: int) -> Any:
        if k not in self._files:
            key = self._shards[k]["file"]
            if isinstance(self.store, FileStore):
                path = local_path(self.store.uri) / key
            else:
                # named by output and shard, so outputs can share one cache_dir
                tag = hashlib.sha256(self.store.uri.encode()).hexdigest()[:12]
                path = self._cache / f"{tag}-{k:05d}.h5"
                if not path.exists():
                    self.store.download_file(key, str(path))
            what = f"{self.store.uri}{key}"
            expected = self._shards[k].get("bytes")
            if expected is not None and path.stat().st_size != expected:
                raise DamagedOutput(f"{what} is {path.stat().st_size} bytes, the manifest says "
                                    f"{expected} — it is damaged or truncated: {RERUN}")
            self._files[k] = open_h5(path, what)
        return self._files[k]

    @property
    def ids(self) -> list[str]:
        return [i for k, _ in enumerate(self._shards) for i in self._shard_ids(k)]

    def __iter__(self) -> Iterator[str]:
        for k in range(len(self._shards)):
            yield from self._shard_ids(k)

    def _shard_ids(self, k: int) -> list[str]:
        h5 = self._file(k)
        with h5_errors(f"{self.store.uri}{self._shards[k]['file']}"):
            raw = h5["ids"][:]
        return [x.decode() if isinstance(x, bytes) else x for x in raw]

    # --- access
    def _locate(self, row: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._starts, row) - 1
        return k, row - self._starts[k]

    def __getitem__(self, seq_id: str) -> np.ndarray:
        if self._index is None:
            self._index = {i: n for n, i in enumerate(self.ids)}
        if seq_id not in self._index:
            raise KeyError(seq_id)
        k, r = self._locate(self._index[seq_id])
        h5 = self._file(k)
        with h5_errors(f"{self.store.uri}{self._shards[k]['file']}"):
            return np.asarray(h5["embeddings"][r])

    def __contains__(self, seq_id: object) -> bool:
        if self._index is None:
            self._index = {i: n for n, i in enumerate(self.ids)}
        return seq_id in self._index

    def batches(self, size: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, embeddings)`` blocks in output order, one shard file open at a time."""
        if size < 1:
            raise ValueError("batch size must be at least 1")
        for k in range(len(self._shards)):
            h5 = self._file(k)
            n = len(h5["ids"])
            for lo in range(0, n, size):
                ids = [x.decode() if isinstance(x, bytes) else x for x in h5["ids"][lo : lo + size]]
                yield ids, np.asarray(h5["embeddings"][lo : lo + size])

    def to_numpy(self) -> np.ndarray:
        out = np.empty((len(self), self.dim), dtype=self.manifest["dtype"])
        row = 0
        for _, block in self.batches():
            out[row : row + len(block)] = block
            row += len(block)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._own_cache:  # downloaded shard files: the whole output, on local disk
            shutil.rmtree(self._cache, ignore_errors=True)

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(uri: str, storage: StorageSpec | None = None, cache_dir: str | None = None) -> Embeddings:
    """Open a finished job's output (a path, file:// or s3:// prefix)."""
    return Embeddings(open_store(uri, storage), cache_dir)
