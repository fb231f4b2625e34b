"""The ``s3://`` half of :mod:`embedjob.store`: the client, error mapping and :class:`S3Store`.

Imported by :mod:`embedjob.store` (which re-exports these names); boto3 is loaded only when
an S3 store is opened.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from embedjob.failures import StorageError, TransientStorageError
from embedjob.logs import log
from embedjob.s3io import RetryingBody, digest_of, same_bytes
from embedjob.spec import StorageSpec
from embedjob.store import (
    ObjectNotFound,
    _as_prefix,
    _check_key,
    _file_op,
    _temp_beside,
    split_s3_uri,
)

T = TypeVar("T")

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
_clients_lock = threading.RLock()  # _make_client runs under it too
_session: Any = None


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


def _make_client(storage: StorageSpec, credentials: Mapping[str, str | None] | None = None
                 ) -> Any:
    """A client with the standard configuration; ``credentials`` (aws_access_key_id, …)
    instead of the environment's, for the operator's job-scoped reads."""
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
    if credentials is None:  # the environment's chain (keys, profile, IRSA): its own Session
        import boto3

        session = boto3.session.Session()
    else:
        session = _shared_session()
    with _clients_lock:  # a Session is not thread-safe; its clients are
        return session.client("s3", endpoint_url=storage.endpoint_url,
                              region_name=storage.region, config=config, **(credentials or {}))


def _shared_session() -> Any:
    """One boto3 Session for clients with explicit credentials: its loader parses the S3
    service model once (a Session per client re-parses it — the operator opens one client
    per job and again every few minutes, and would keep and garbage-collect each copy).
    Credentials given per client never touch the shared session."""
    global _session
    if _session is None:
        import boto3

        _session = boto3.session.Session()
    return _session


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

    def open_read(self, key: str, etags: list[str] | None = None) -> BinaryIO:
        """Stream an object; a body cut off mid-way is resumed (embedjob.s3io). ``etags``
        receives the object's ETag."""
        full = self._key(key)
        uri = f"s3://{self.bucket}/{full}"

        def fetch(start: int, etag: str | None) -> tuple[Any, str | None]:
            extra: dict[str, str] = {"Range": f"bytes={start}-"} if start else {}
            if etag:
                extra["IfMatch"] = etag  # the same object, not one replaced meanwhile
            answer = self._call("read", full, lambda: self.client.get_object(
                Bucket=self.bucket, Key=full, **extra))
            if etags is not None and not etag:
                etags.append(str(answer.get("ETag", "")))
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

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its ETag (a cut body resumed); None when it does not exist."""
        etags: list[str] = []
        try:
            with self.open_read(key, etags) as stream:
                return stream.read(), etags[0]
        except ObjectNotFound:
            return None

    def replace_bytes(self, key: str, data: bytes, etag: str) -> str | None:
        """PUT only if the object still has ``etag`` (``If-Match``, AWS since 2024): the new
        ETag, or None when it was changed or removed meanwhile (412, 409, 404). Exactly one
        of several writers pinned to the same ETag succeeds. A retried PUT whose first
        response was lost also gets None: the caller reads back to see whose bytes are there."""
        from botocore.exceptions import ClientError

        full = self._key(key)
        try:
            answer = self.client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                            IfMatch=etag)
        except ClientError as err:
            code, status = _error_code(err)
            if code != "NoSuchBucket" and (status in (404, 409, 412) or code in (
                    "PreconditionFailed", "ConditionalRequestConflict", *_NOT_FOUND_CODES)):
                return None
            raise map_s3_error(err, "write to", f"s3://{self.bucket}/{full}") from None
        except Exception as err:
            raise map_s3_error(err, "write to", f"s3://{self.bucket}/{full}") from None
        return str(answer.get("ETag", ""))

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
        for item in self._listed(prefix):
            yield item["Key"][len(self.prefix) :]

    def list_tagged(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Keys under ``prefix`` with their ETags: 1,000 per request."""
        for item in self._listed(prefix):
            yield item["Key"][len(self.prefix) :], str(item.get("ETag", ""))

    def _listed(self, prefix: str) -> Iterator[dict[str, Any]]:
        full = self.prefix + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=full))
        while (page := self._call("list", full, lambda: next(pages, None))) is not None:
            # S3 lists keys in UTF-8 byte order, which is Python's str order: already sorted.
            yield from page.get("Contents", ())

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call("delete", full, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self.prefix + prefix.strip("/"), self.storage)
