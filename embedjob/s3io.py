"""S3 reads that survive a dropped connection, and the create-once check that knows its own bytes.

botocore retries a request until its response headers arrive; a body cut off afterwards
(IncompleteRead, a connection reset, a read timeout) surfaces in the caller's ``read``. Here
such a read is resumed with a ranged GET pinned to the object's ETag, under the same policy as
botocore's requests (``AWS_MAX_ATTEMPTS`` attempts, exponential backoff with jitter), and each
retry is logged. Permanent answers (403, NoSuchBucket, 404) are never retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from embedjob.failures import StorageError, TransientStorageError
from embedjob.logs import log

MAX_BACKOFF_SECONDS = 20.0  # botocore's standard mode caps its backoff here too


def max_attempts() -> int:
    """Attempts per read, as for requests (``AWS_MAX_ATTEMPTS``, default 8)."""
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "8")))
    except ValueError:
        return 8


def backoff_seconds(retry: int, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff, botocore's standard formula (``retry`` from 0)."""
    return min(rng() * 2.0**retry, MAX_BACKOFF_SECONDS)


def stream_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the connection broke while the body was being read'."""
    import http.client

    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    return (
        bx.IncompleteReadError, bx.ReadTimeoutError, bx.ResponseStreamingError,
        bx.ConnectionClosedError, bx.EndpointConnectionError,
        ux.ProtocolError, ux.ReadTimeoutError, ux.IncompleteRead,
        http.client.IncompleteRead, ConnectionError, TimeoutError,
    )  # fmt: skip


class RetryingBody(io.RawIOBase):
    """A raw stream over one S3 object that resumes where a broken body stopped.

    ``fetch(start, etag)`` issues the GET (ranged from ``start`` when > 0, ``If-Match: etag``)
    and returns ``(body, etag)``; it raises StorageError for answers that are not transient.
    """

    def __init__(self, fetch: Callable[[int, str | None], tuple[Any, str | None]], uri: str,
                 map_error: Callable[[BaseException], StorageError]) -> None:
        self._fetch, self._uri, self._map = fetch, uri, map_error
        self._pos = 0
        self._body, self._etag = fetch(0, None)
        self._retries = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            try:
                data = self._body.read(len(buffer))
            except stream_errors() as err:
                self._resume(err)
                continue
            except Exception as err:
                raise self._map(err) from None
            n = len(data)
            buffer[:n] = data
            self._pos += n
            return n

    def _resume(self, err: BaseException) -> None:
        """Back off and reopen the object at the current position (or give up, one line)."""
        self._retries += 1
        if self._retries >= max_attempts():
            raise TransientStorageError(
                f"cannot read {self._uri}: connection broke mid-body {self._retries} times "
                f"({type(err).__name__}) — transient; retry later"
            ) from None
        delay = backoff_seconds(self._retries - 1)
        log("storage.read_retry", uri=self._uri, at=self._pos, retry=self._retries,
            error=type(err).__name__, backoff=round(delay, 2))
        time.sleep(delay)
        self._close_body()
        self._body, _ = self._fetch(self._pos, self._etag)

    def _close_body(self) -> None:
        with contextlib.suppress(Exception):  # the connection is already broken
            self._body.close()

    def close(self) -> None:
        self._close_body()
        super().close()


def digest_of(body: bytes | BinaryIO) -> tuple[str, str, int]:
    """(sha256, md5, size) of bytes or of a seekable file, read from its start."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    if isinstance(body, bytes | bytearray | memoryview):
        blocks: Any = [bytes(body)]
    else:
        body.seek(0)
        blocks = iter(lambda: body.read(1 << 20), b"")
    for block in blocks:
        sha.update(block)
        md5.update(block)
        size += len(block)
    if not isinstance(body, bytes | bytearray | memoryview):
        body.seek(0)
    return sha.hexdigest(), md5.hexdigest(), size


def same_bytes(head: dict[str, Any], read: Callable[[], BinaryIO], ours: tuple[str, str, int]
               ) -> bool:
    """Whether the stored object (``head``: a HeadObject answer) holds exactly our bytes.

    A size mismatch settles it at once; a plain-MD5 ETag equal to ours settles it without a
    download; otherwise the object is streamed and its sha256 compared."""
    sha, md5, size = ours
    if int(head.get("ContentLength", -1)) != size:
        return False
    if str(head.get("ETag", "")).strip('"') == md5:
        return True
    digest = hashlib.sha256()
    with read() as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == sha
