"""Object store: local paths/``file://`` and ``s3://`` behind one small interface.

Every write is all or nothing (a temp file renamed into place on disk, one PUT or a completed
multipart upload on S3), and ``create_*`` writes a key at most once: ``os.link`` on disk,
``If-None-Match: *`` on S3 (AWS since 2024, MinIO, moto's server). A create that finds exactly
its own bytes already there (a retried PUT whose first response was lost) has succeeded;
streamed reads resume after a dropped connection (:mod:`embedjob.s3io`). Errors come out as
:class:`StorageError` (permanent: denied, no bucket, not found, unwritable) or
:class:`TransientStorageError` (throttling, 5xx, connection trouble that outlived botocore's
own retries), with one-line messages that never carry credentials.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import unquote

from embedjob.failures import StorageError
from embedjob.spec import StorageSpec

T = TypeVar("T")


class Store(Protocol):
    """A prefix in a bucket or a directory. Keys are '/'-separated and relative to the root."""

    uri: str  # the root, normalised (file:///abs/path/ or s3://bucket/prefix/)

    def open_read(self, key: str) -> BinaryIO: ...  # streaming; raises StorageError if missing
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...  # atomic: all or nothing
    def create_bytes(self, key: str, data: bytes) -> bool: ...  # create once; False: other bytes
    def upload_file(self, key: str, path: str) -> None: ...  # atomic; transfer manager on S3
    def create_file(self, key: str, path: str) -> bool: ...  # create once from a local file
    def download_file(self, key: str, path: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...  # keys under prefix, sorted
    def read_tagged(self, key: str) -> tuple[bytes, str] | None: ...  # with its tag; None: missing
    def list_tagged(self, prefix: str) -> Iterator[tuple[str, str]]: ...  # (key, tag), sorted
    def delete(self, key: str) -> None: ...  # missing is fine
    def child(self, prefix: str) -> Store: ...  # a store rooted at root + prefix


class ObjectNotFound(StorageError):
    """The key (or file) does not exist: permanent, but callers may want to say more."""


def open_store(uri: str, storage: StorageSpec | None = None) -> Store:
    """A store rooted at ``uri`` (a path, file://… or s3://bucket/prefix)."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        from embedjob.store_s3 import S3Store

        return S3Store(bucket, _as_prefix(prefix), storage or StorageSpec())
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri}: use a path, file:// or s3://")
    return FileStore(local_path(uri))


def open_uri(uri: str, storage: StorageSpec | None = None) -> BinaryIO:
    """Stream one object named by a full URI (input FASTA, weights)."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{uri} names a prefix, not an object: give the full object key")
        from embedjob.store_s3 import S3Store

        return S3Store(bucket, "", storage or StorageSpec()).open_read(key)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri}: use a path, file:// or s3://")
    path = local_path(uri)
    return _file_op(str(path), "read", lambda: open(path, "rb"))


# --- URIs ----------------------------------------------------------------------------------


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI {uri}: expected s3://bucket/key")
    return bucket, key


def local_path(uri: str) -> Path:
    """A local path from a plain path or a ``file://`` URI (``file://localhost/x`` too)."""
    if uri.startswith("file://"):
        rest = unquote(uri.removeprefix("file://"))
        uri = rest.removeprefix("localhost") if rest.startswith("localhost/") else rest
    return Path(uri).expanduser().absolute()


def _as_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _check_key(key: str) -> str:
    """Keys are relative and never climb out of the root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]):
        raise ValueError(f"invalid store key {key!r}")
    if parts[-1] in ("", ".", ".."):
        raise ValueError(f"invalid store key {key!r}")
    return key


# --- local files ---------------------------------------------------------------------------

_TMP_PREFIX = ".embedjob-tmp-"


def _file_op(where: str, verb: str, op: Callable[[], T]) -> T:
    """Run a filesystem operation; OSError becomes a one-line StorageError."""
    try:
        return op()
    except FileNotFoundError:
        if verb == "write to":
            raise StorageError(f"cannot create {where} — choose a writable output.uri") from None
        raise ObjectNotFound(f"not found: {where}") from None
    except PermissionError:
        fix = " — choose a writable output.uri" if verb == "write to" else ""
        raise StorageError(f"cannot {verb} {where}: permission denied{fix}") from None
    except IsADirectoryError:
        raise StorageError(f"cannot {verb} {where}: it is a directory") from None
    except NotADirectoryError:
        raise StorageError(
            f"cannot {verb} {where}: a parent is a file, not a directory — "
            "output.uri must name a directory"
        ) from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise StorageError(f"cannot {verb} {where}: {reason}") from None


class FileStore:
    """A directory. Temp files (``.embedjob-tmp-*``) live beside their target and are never
    listed, so a rename is atomic and a crash leaves no half-written key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri().rstrip("/") + "/"

    def __repr__(self) -> str:
        return f"FileStore({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        return _file_op(str(path), "read", lambda: open(path, "rb"))

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        return _file_op(str(path), "read", path.read_bytes)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._publish(key, lambda f: f.write(data), replace=True)

    def create_bytes(self, key: str, data: bytes) -> bool:
        return self._publish(key, lambda f: f.write(data), replace=False)

    def upload_file(self, key: str, path: str) -> None:
        self._publish(key, lambda f: _copy_from(path, f), replace=True)

    def create_file(self, key: str, path: str) -> bool:
        return self._publish(key, lambda f: _copy_from(path, f), replace=False)

    def download_file(self, key: str, path: str) -> None:
        src = self._path(key)
        _atomic_local_write(Path(path), lambda f: _copy_from(str(src), f, key_uri=str(src)))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        keys = [k for k in self._walk(base) if k.startswith(prefix)]
        return iter(sorted(keys))

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The file's bytes and a tag that changes with every write (an ETag's role)."""
        path = self._path(key)

        def read() -> tuple[bytes, str]:
            with open(path, "rb") as f:
                return f.read(), _file_tag(os.fstat(f.fileno()))

        try:
            return _file_op(str(path), "read", read)
        except ObjectNotFound:
            return None

    def list_tagged(self, prefix: str) -> Iterator[tuple[str, str]]:
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # removed since the walk
                yield key, _file_tag(self._path(key).stat())

    def _walk(self, base: Path) -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if not name.startswith(_TMP_PREFIX):
                    yield name if rel == "." else f"{rel}/{name}"

    def delete(self, key: str) -> None:
        path = self._path(key)
        _file_op(str(path), "delete", lambda: path.unlink(missing_ok=True))

    def child(self, prefix: str) -> FileStore:
        return FileStore(self.root / prefix.strip("/")) if prefix.strip("/") else self

    def _publish(self, key: str, fill: Callable[[BinaryIO], object], *, replace: bool) -> bool:
        """Write a temp file beside the target, then rename (replace) or link (create once)."""
        target = self._path(key)
        _file_op(
            str(target.parent), "write to", lambda: target.parent.mkdir(parents=True, exist_ok=True)
        )
        tmp = _file_op(str(target.parent), "write to", lambda: _temp_beside(target))
        try:
            with open(tmp, "wb") as f:
                _file_op(str(target), "write to", lambda: fill(f))
                f.flush()
                os.fsync(f.fileno())
            if replace:
                _file_op(str(target), "write to", lambda: os.replace(tmp, target))
                return True
            return _file_op(str(target), "write to", lambda: _link_once(tmp, target))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _file_tag(st: os.stat_result) -> str:
    # Every write renames a new file into place: a new inode and mtime.
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _temp_beside(target: Path) -> str:
    fd, name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{target.name}.", dir=target.parent)
    os.close(fd)
    return name


def _link_once(tmp: str, target: Path) -> bool:
    """Publish ``tmp`` at ``target`` unless it exists. A hard link is atomic and fails on an
    existing name; filesystems without links fall back to an exclusive create + copy."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return _same_file(tmp, target)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return _same_file(tmp, target)
    with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    return True


def _same_file(tmp: str, target: Path) -> bool:
    """A create-once that finds exactly its own bytes already there has succeeded (a retried
    write whose first try landed); anything else is somebody else's file."""
    try:
        return filecmp.cmp(tmp, target, shallow=False)
    except OSError:
        return False


def _copy_from(path: str, dst: BinaryIO, key_uri: str | None = None) -> None:
    with _file_op(key_uri or path, "read", lambda: open(path, "rb")) as src:
        shutil.copyfileobj(src, dst, 1 << 20)


def _atomic_local_write(target: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Download targets are local files too: never leave a half-written one."""
    FileStore(target.parent)._publish(target.name, fill, replace=True)


def __getattr__(name: str) -> Any:
    """The S3 half lives in :mod:`embedjob.store_s3`; its names stay importable from here."""
    if name in ("S3Store", "map_s3_error", "s3_client"):
        from embedjob import store_s3

        return getattr(store_s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
