"""One ``embedjob run`` per output: a lease on the output, taken before any work starts.

On a local disk the lease is an ``flock`` on ``.embedjob.lock`` in the output directory: the
kernel drops it when the runner dies, however it dies, so it is never stale. On S3 it is an
object holding an expiry that the runner renews. It is created only if absent
(``If-None-Match: *``); a lease past its expiry (the runner was killed) is taken over by a
PUT pinned to the ETag of the stale lease that was read (``If-Match``), and each renewal is
pinned to the ETag of the runner's own last write. Of several runners that find the same
stale lease at once exactly one write succeeds; the others get 412, read the new holder
back and refuse, naming it. A write whose response was lost and whose retry got 412 is
recognised by reading back its own token.
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

from embedjob.failures import EmbedjobError, StorageError, TransientStorageError
from embedjob.store import FileStore, ObjectNotFound, Store
from embedjob.store_s3 import S3Store

LOCK_FILE = ".embedjob.lock"
LEASE_KEY = ".embedjob-lease.json"
LEASE_SECONDS = 90.0
"""An S3 lease not renewed for this long belongs to a runner that died; it is taken over."""
RENEW_SECONDS = 20.0
TAKEOVER_TRIES = 4
"""Looks at the lease while taking it; more than one change of hands meanwhile is refused."""


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
    _etag: str = ""  # S3: the ETag of our last write of the lease
    _since: float = field(default_factory=time.time)

    def document(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "since": self._since, "expires": now + LEASE_SECONDS,
                "process": process_identity(os.getpid())}

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
        """Create the lease, or take over a stale one; at most one contender wins each try."""
        data = json.dumps(self.document()).encode()
        for attempt in range(TAKEOVER_TRIES + 1):
            doc, etag = self._look()
            if etag is not None and doc.get("token") == self.token:  # ours
                self._etag = etag
                return
            if etag is not None and _live(doc):
                raise _in_use(self.store.uri, doc)
            if attempt == TAKEOVER_TRIES:
                break
            if etag is None:
                self._s3.create_bytes(LEASE_KEY, data)
            else:  # stale: its runner died. Only a write pinned to what we saw may replace it
                self._s3.replace_bytes(LEASE_KEY, data, etag)
            # Won or lost, the next look says who holds it now (a lost reply included).
        raise TransientStorageError(
            f"cannot take the lease on {self.store.uri}: it changed hands {TAKEOVER_TRIES} "
            "times while being taken — another `embedjob run` is starting on it; retry")

    # --- keeping it
    def renew_if_due(self) -> None:
        """Push the expiry forward (S3); raises OutputInUse if another runner took over."""
        if self._file is not None or time.monotonic() - self._renewed < RENEW_SECONDS:
            return
        data = json.dumps(self.document()).encode()
        etag = self._s3.replace_bytes(LEASE_KEY, data, self._etag)
        if etag is None:  # changed since our last write: taken over, or our own lost reply
            doc, etag = self._look()
            if etag is None and self._s3.create_bytes(LEASE_KEY, data):  # deleted by hand
                doc, etag = self._look()
            if etag is None or doc.get("token") != self.token:
                raise _in_use(self.store.uri, doc)
        self._etag = etag
        self._renewed = time.monotonic()

    def _look(self) -> tuple[dict[str, object], str | None]:
        """The lease document and its ETag (({}, None) when there is none)."""
        seen = self._s3.read_tagged(LEASE_KEY)
        return (_parse(seen[0].decode(errors="replace")), seen[1]) if seen else ({}, None)

    @property
    def _s3(self) -> S3Store:
        assert isinstance(self.store, S3Store), self.store
        return self.store

    def _holder(self) -> dict[str, object]:
        try:
            return _parse(self.store.read_bytes(LEASE_KEY).decode(errors="replace"))
        except ObjectNotFound:  # other storage errors propagate: an outage is not "free"
            return {}


def process_identity(pid: int) -> str | None:
    """'<boot id>/<pid>/<start time>': names one live process on this machine across pid
    reuse (None when it has exited, or where /proc does not say)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    boot = _boot_id()
    if not boot or len(fields) < 20 or fields[0] == "Z":  # a zombie has exited
        return None
    return f"{boot}/{pid}/{fields[19]}"


def _live(doc: dict[str, object]) -> bool:
    """Is the lease's runner still there? Not past its expiry — and, when it ran on this
    machine, its process still exists (a runner that gave up during a storage outage, or was
    killed, could not delete its lease; a re-run here need not wait out the expiry)."""
    if float(str(doc.get("expires", 0))) <= time.time():
        return False
    holder, boot = doc.get("process"), _boot_id()
    if not isinstance(holder, str) or not boot or not holder.startswith(f"{boot}/"):
        return True  # another machine (or no /proc): only the expiry can tell
    pid = holder.split("/")[1]
    return pid.isdigit() and process_identity(int(pid)) == holder


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _parse(text: str) -> dict[str, object]:
    try:
        doc = json.loads(text or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
