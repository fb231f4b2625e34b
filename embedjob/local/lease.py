"""One ``embedjob run`` per output: a lease on the output, taken before any work starts.

On a local disk the lease is an ``flock`` on ``.embedjob.lock`` in the output directory: the
kernel drops it when the runner dies, however it dies, so it is never stale. On S3 it is an
object created only if absent (``If-None-Match: *``) holding an expiry that the runner
renews; a lease past its expiry (the runner was killed) is taken over. Two runners that both
find the same stale lease can both delete it, but only one create succeeds, and each renewal
reads the holder back, so a runner that lost its lease learns it within one renewal.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from embedjob.failures import EmbedjobError, StorageError
from embedjob.store import FileStore, ObjectNotFound, Store

LOCK_FILE = ".embedjob.lock"
LEASE_KEY = ".embedjob-lease.json"
LEASE_SECONDS = 90.0
"""An S3 lease not renewed for this long belongs to a runner that died; it is taken over."""
RENEW_SECONDS = 20.0


class OutputInUse(EmbedjobError):
    """Another runner holds the output."""

    exit_code = 75  # EX_TEMPFAIL: try again when the other run has ended


def holder_text(doc: dict[str, object]) -> str:
    """'pid 123 on host, since 12:00:03 UTC' from a lease document."""
    since = time.strftime("%H:%M:%S UTC", time.gmtime(float(str(doc.get("since", 0)))))
    return f"pid {doc.get('pid', '?')} on {doc.get('host', '?')}, since {since}"


def _in_use(uri: str, doc: dict[str, object]) -> OutputInUse:
    return OutputInUse(
        f"output {uri} is in use by another `embedjob run` ({holder_text(doc)}): wait for it "
        "to finish or stop it, or choose another output.uri"
    )


@dataclass
class Lease:
    store: Store
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _file: IO[str] | None = None
    _renewed: float = 0.0

    def document(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "since": now, "expires": now + LEASE_SECONDS}

    # --- taking and giving back
    def acquire(self) -> Lease:
        if isinstance(self.store, FileStore):
            self._lock_file(self.store.root)
        else:
            self._create_object()
        self._renewed = time.monotonic()
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays (unlinking races)
            self._file = None
            return
        try:
            if self._holder().get("token") == self.token:
                self.store.delete(LEASE_KEY)
        except StorageError:
            pass  # it expires on its own

    def _lock_file(self, root: Path) -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            handle = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
        except OSError as err:
            raise StorageError(f"cannot write to {root / LOCK_FILE}: "
                               f"{err.strerror or type(err).__name__} — choose a writable "
                               "output.uri") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read()
            handle.close()
            raise _in_use(self.store.uri, _parse(text)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self.document()))
        handle.flush()
        self._file = handle

    def _create_object(self) -> None:
        data = json.dumps(self.document()).encode()
        if self.store.create_bytes(LEASE_KEY, data):
            return
        current = self._holder()
        if float(str(current.get("expires", 0))) > time.time():
            raise _in_use(self.store.uri, current)
        # Stale: its runner died. Delete and create once; a rival doing the same loses here.
        self.store.delete(LEASE_KEY)
        if not self.store.create_bytes(LEASE_KEY, data):
            raise _in_use(self.store.uri, self._holder())

    # --- keeping it
    def renew_if_due(self) -> None:
        """Push the expiry forward (S3); raises OutputInUse if another runner took over."""
        if self._file is not None or time.monotonic() - self._renewed < RENEW_SECONDS:
            return
        current = self._holder()
        if current.get("token") not in (None, self.token):
            raise _in_use(self.store.uri, current)
        doc = {**self.document(), "since": current.get("since", time.time())}
        self.store.write_bytes(LEASE_KEY, json.dumps(doc).encode())
        self._renewed = time.monotonic()

    def _holder(self) -> dict[str, object]:
        try:
            return _parse(self.store.read_bytes(LEASE_KEY).decode(errors="replace"))
        except ObjectNotFound:  # other storage errors propagate: an outage is not "free"
            return {}


def _parse(text: str) -> dict[str, object]:
    try:
        doc = json.loads(text or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
