"""Object store: local paths/``file://`` and ``s3://`` behind one small interface.

INTERFACE CONTRACT (being implemented; signatures are fixed, other modules code against them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Protocol

from embedjob.spec import StorageSpec


class Store(Protocol):
    """A prefix in a bucket or a directory. Keys are '/'-separated and relative to the root."""

    uri: str  # the root, normalised (file:///abs/path/ or s3://bucket/prefix/)

    def open_read(self, key: str) -> BinaryIO: ...  # streaming; raises StorageError if missing
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...  # atomic: all or nothing
    def create_bytes(self, key: str, data: bytes) -> bool: ...  # create once; False if it existed
    def upload_file(self, key: str, path: str) -> None: ...  # atomic; transfer manager on S3
    def create_file(self, key: str, path: str) -> bool: ...  # create once from a local file
    def download_file(self, key: str, path: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...  # keys under prefix, sorted
    def delete(self, key: str) -> None: ...  # missing is fine
    def child(self, prefix: str) -> Store: ...  # a store rooted at root + prefix


def open_store(uri: str, storage: StorageSpec | None = None) -> Store:
    """A store rooted at ``uri`` (a path, file://… or s3://bucket/prefix)."""
    raise NotImplementedError


def open_uri(uri: str, storage: StorageSpec | None = None) -> BinaryIO:
    """Stream one object named by a full URI (input FASTA, weights)."""
    raise NotImplementedError
