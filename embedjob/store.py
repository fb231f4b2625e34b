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
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import unquote

from embedjob.failures import StorageError, TransientStorageError
from embedjob.logs import log
from embedjob.s3io import RetryingBody, digest_of, same_bytes
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
    def delete(self, key: str) -> None: ...  # missing is fine
    def child(self, prefix: str) -> Store: ...  # a store rooted at root + prefix


class ObjectNotFound(StorageError):
    """The key (or file) does not exist: permanent, but callers may want to say more."""


def open_store(uri: str, storage: StorageSpec | None = None) -> Store:
    """A store rooted at ``uri`` (a path, file://… or s3://bucket/prefix)."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
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


# --- S3 ------------------------------------------------------------------------------------

_PERMANENT_CODES = {
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access denied",
    "AccountProblem": "access denied",
    "InvalidAccessKeyId": "unknown access key",
    "SignatureDoesNotMatch": "bad secret key (signature mismatch)",
    "ExpiredToken": "expired credentials",
    "InvalidToken": "invalid session token",
    "Forbidden": "access denied",
    "403": "access denied",
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
    "ConditionalRequestConflict", "OperationAborted", "500", "502", "503", "504",
}  # fmt: skip
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}

_MULTIPART_THRESHOLD = 64 * 1024 * 1024
_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


def s3_client(storage: StorageSpec | None = None) -> Any:
    """A cached boto3 S3 client for ``storage`` (endpoint, region) and the AWS environment.

    Clients are thread-safe; the cache key includes the access key id and profile so that a
    changed environment (another Secret) never reuses a client built for other credentials.
    ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` tune botocore's retries as usual.
    """
    storage = storage or StorageSpec()
    env = os.environ
    cache_key = (
        storage.endpoint_url,
        storage.region,
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_PROFILE"),
        env.get("AWS_MAX_ATTEMPTS"),
        env.get("AWS_RETRY_MODE"),
    )
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = _clients[cache_key] = _make_client(storage)
        return client


def _make_client(storage: StorageSpec) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
        },
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=32,
        # Only checksum when the operation requires it: MinIO and older S3-compatible stores
        # reject the newer default trailing checksums on some operations.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=storage.endpoint_url, region_name=storage.region, config=config
    )


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=_MULTIPART_THRESHOLD,
        multipart_chunksize=16 * 1024 * 1024,
        max_concurrency=8,
    )


def _error_code(err: BaseException) -> tuple[str, int]:
    response = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _root_cause(err: BaseException) -> BaseException:
    """boto3's transfer manager wraps ClientError (S3UploadFailedError, RetriesExceeded)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(err, RetriesExceededError) and err.last_exception is not None:
        return err.last_exception
    if isinstance(err, S3UploadFailedError) and err.__context__ is not None:
        return err.__context__
    return err


def map_s3_error(err: BaseException, action: str, uri: str) -> StorageError:
    """Turn a boto3/botocore exception into a one-line StorageError (never with secrets)."""
    from botocore import exceptions as bx

    err = _root_cause(err)
    bucket = split_s3_uri(uri)[0]
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StorageError(
            f"cannot {action} {uri}: no AWS credentials found — set storage.credentialsSecret, "
            "a serviceAccountName with an IRSA role, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(err, bx.ClientError):
        code, status = _error_code(err)
        return _map_client_error(code, status, action, uri, bucket)
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectionError | bx.HTTPClientError):
        return TransientStorageError(
            f"cannot {action} {uri}: cannot reach the S3 endpoint ({type(err).__name__}) — "
            "check storage.endpointUrl and the network; will be retried"
        )
    if isinstance(err, bx.BotoCoreError):
        return TransientStorageError(f"cannot {action} {uri}: {type(err).__name__}")
    return StorageError(f"cannot {action} {uri}: {type(err).__name__}: {err}")


def _map_client_error(code: str, status: int, action: str, uri: str, bucket: str) -> StorageError:
    if code == "NoSuchBucket":
        return StorageError(
            f"cannot {action} {uri}: bucket {bucket} does not exist — check the URI, "
            "storage.endpointUrl and storage.region"
        )
    if code in _NOT_FOUND_CODES or (status == 404 and not code):
        return ObjectNotFound(f"not found: {uri}")
    if code in _PERMANENT_CODES or status == 403:
        what = _PERMANENT_CODES.get(code, "access denied")
        return StorageError(
            f"cannot {action} {uri}: {what} ({code or status}) — check the credentials "
            f"(storage.credentialsSecret or the IRSA role) and the policy of bucket {bucket}"
        )
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientStorageError(
            f"cannot {action} {uri}: {code or status} after retries — transient; retry later"
        )
    return StorageError(f"cannot {action} {uri}: S3 error {code or status}")


class S3Store:
    """A prefix in an S3 bucket (AWS, MinIO, moto)."""

    def __init__(self, bucket: str, prefix: str, storage: StorageSpec | None = None) -> None:
        self.bucket = bucket
        self.prefix = _as_prefix(prefix)
        self.storage = storage or StorageSpec()
        self.uri = f"s3://{bucket}/{self.prefix}"

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    @property
    def client(self) -> Any:
        return s3_client(self.storage)

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _call(self, action: str, key: str, op: Callable[[], T]) -> T:
        try:
            return op()
        except StorageError:
            raise
        except Exception as err:
            raise map_s3_error(err, action, f"s3://{self.bucket}/{key}") from None

    def open_read(self, key: str) -> BinaryIO:
        """Stream an object; a body cut off mid-way is resumed (embedjob.s3io)."""
        full = self._key(key)
        uri = f"s3://{self.bucket}/{full}"

        def fetch(start: int, etag: str | None) -> tuple[Any, str | None]:
            extra: dict[str, str] = {"Range": f"bytes={start}-"} if start else {}
            if etag:
                extra["IfMatch"] = etag  # the same object, not one replaced meanwhile
            answer = self._call("read", full, lambda: self.client.get_object(
                Bucket=self.bucket, Key=full, **extra))
            return answer["Body"], answer.get("ETag")

        reader = RetryingBody(fetch, uri, lambda err: map_s3_error(err, "read", uri))
        return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[return-value]

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as stream:
            return stream.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._call(
            "write to",
            full,
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data),
        )

    def create_bytes(self, key: str, data: bytes) -> bool:
        return self._put_once(self._key(key), data)

    def upload_file(self, key: str, path: str) -> None:
        full = self._key(key)
        _file_op(path, "read", lambda: os.stat(path))
        self._call(
            "write to",
            full,
            lambda: self.client.upload_file(path, self.bucket, full, Config=_transfer_config()),
        )

    def create_file(self, key: str, path: str) -> bool:
        # One conditional PUT: create-once records are small (commit records, final files up
        # to S3's 5 GiB single-PUT limit); the body streams from the open file.
        full = self._key(key)
        with _file_op(path, "read", lambda: open(path, "rb")) as f:
            return self._put_once(full, f)

    def _put_once(self, full: str, body: bytes | BinaryIO) -> bool:
        """PUT with ``If-None-Match: *``. When the key already exists (412, or 409 for a
        concurrent conditional write): True if it holds exactly our bytes — botocore retried
        a PUT whose response was lost, and the 412 answers our own first try — else False."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*")
            return True
        except ClientError as err:
            code, status = _error_code(err)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                409,
                412,
            ):
                return self._conflict_outcome(full, body)
            raise map_s3_error(err, "write to", f"s3://{self.bucket}/{full}") from None
        except Exception as err:
            raise map_s3_error(err, "write to", f"s3://{self.bucket}/{full}") from None

    def _conflict_outcome(self, full: str, body: bytes | BinaryIO) -> bool:
        head = self._call("read", full, lambda: self._head(full))
        if head is None:
            # 409 with nothing there: the other write failed and ours did not happen either —
            # report the truth, not a guess.
            raise TransientStorageError(f"cannot write to s3://{self.bucket}/{full}: "
                                        "concurrent conditional write (409) — retry")
        ours = digest_of(body)
        same = same_bytes(head, lambda: self.open_read(full[len(self.prefix):]), ours)
        if same:
            log("storage.create_found_own", uri=f"s3://{self.bucket}/{full}", bytes=ours[2])
        return same

    def _head(self, full: str) -> dict[str, Any] | None:
        """The HeadObject answer, or None when the key does not exist."""
        from botocore.exceptions import ClientError

        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=full))
        except ClientError as err:
            code, status = _error_code(err)
            if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
                return None
            raise

    def download_file(self, key: str, path: str) -> None:
        full = self._key(key)
        target = Path(path)
        _file_op(
            str(target.parent), "write to", lambda: target.parent.mkdir(parents=True, exist_ok=True)
        )
        tmp = _file_op(str(target.parent), "write to", lambda: _temp_beside(target))
        try:
            self._call(
                "read",
                full,
                lambda: self.client.download_file(
                    self.bucket, full, tmp, Config=_transfer_config()
                ),
            )
            _file_op(path, "write to", lambda: os.replace(tmp, target))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def exists(self, key: str) -> bool:
        full = self._key(key)
        return self._call("read", full, lambda: self._head(full)) is not None

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self.prefix + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=full))
        while (page := self._call("list", full, lambda: next(pages, None))) is not None:
            # S3 lists keys in UTF-8 byte order, which is Python's str order: already sorted.
            for item in page.get("Contents", ()):
                yield item["Key"][len(self.prefix) :]

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call("delete", full, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self.prefix + prefix.strip("/"), self.storage)
