"""Checkpoint parts: immutable, counted once committed, validated on resume.

A part is an ``.npz`` of ``positions`` (rows of the shard input), ``ids`` and
``embeddings``, named per attempt so two attempts of a shard never write the same key. It
counts only once its commit record exists, and the record is written after the part's
upload has finished, so a part cut short by a kill is never trusted. On resume every
committed part is read back and checked (checksum, count, ids against the shard input);
anything that fails is dropped and its sequences are embedded again. Where two attempts
embedded the same row, the first committed part in name order wins, so the result does
not depend on timing.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import numpy as np

from embedjob import layout
from embedjob.failures import EmbedjobError, StorageError
from embedjob.logs import log
from embedjob.progress import ShardProgress, progress_document
from embedjob.store import ObjectNotFound, Store
from embedjob.times import from_epoch


@dataclass(frozen=True)
class CommitRecord:
    name: str
    attempt: int
    count: int
    sha256: str
    size: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CommitRecord:
        return cls(**json.loads(data))


@dataclass(frozen=True)
class Part:
    positions: np.ndarray
    ids: np.ndarray
    embeddings: np.ndarray


def encode_part(positions: np.ndarray, ids: Sequence[str], embeddings: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, positions=positions.astype(np.int64), ids=np.asarray(ids, dtype=str),
             embeddings=embeddings)
    return buf.getvalue()


def decode_part(data: bytes) -> Part:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return Part(npz["positions"], npz["ids"], npz["embeddings"])


def attempt_of(name: str) -> int:
    return int(name[1:5])


# --- resume ---------------------------------------------------------------------------------


@dataclass
class Committed:
    """The validated parts of a shard and which input rows they cover."""

    parts: list[CommitRecord]
    done: np.ndarray  # bool per shard row

    @property
    def count(self) -> int:
        return int(self.done.sum())


class PartRejected(Exception):
    """A committed part that cannot be trusted; its rows are embedded again."""


def _checked_part(rec: CommitRecord, data: bytes, ids: Sequence[str]) -> Part:
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        raise PartRejected("checksum mismatch")
    try:
        part = decode_part(data)
    except (ValueError, OSError, KeyError) as err:
        raise PartRejected(f"unreadable ({err})") from None
    n = len(part.positions)
    if n != rec.count or len(part.ids) != n or len(part.embeddings) != n:
        raise PartRejected("count mismatch")
    if n and (part.positions.min() < 0 or part.positions.max() >= len(ids)):
        raise PartRejected("rows outside the shard")
    pairs = zip(part.positions.tolist(), part.ids.tolist(), strict=True)
    if any(ids[p] != i for p, i in pairs):
        raise PartRejected("ids do not match the shard input")
    return part


def load_committed(store: Store, shard: int, ids: Sequence[str]) -> Committed:
    """Read back and check every committed part; drop the records of broken ones."""
    done = np.zeros(len(ids), dtype=bool)
    good: list[CommitRecord] = []
    for key in sorted(store.list(layout.shard_commits(shard))):
        try:
            rec = CommitRecord.from_json(store.read_bytes(key))
            part = _checked_part(rec, store.read_bytes(layout.part_key(shard, rec.name)), ids)
        except (ValueError, TypeError, KeyError) as err:
            reason = f"bad commit record ({err})"
        except (PartRejected, ObjectNotFound) as err:  # other storage errors propagate
            reason = str(err)
        else:
            good.append(rec)
            done[part.positions] = True
            continue
        log("part.rejected", key=key, reason=reason)
        store.delete(key)
    return Committed(good, done)


def clean_uncommitted(store: Store, shard: int, attempt: int, committed: Committed) -> int:
    """Delete parts of earlier attempts that never got a commit record."""
    keep = {rec.name for rec in committed.parts}
    removed = 0
    for key in list(store.list(layout.shard_parts(shard))):
        name = key.rsplit("/", 1)[-1].removesuffix(".npz")
        if name not in keep and attempt_of(name) < attempt:
            store.delete(key)
            removed += 1
    return removed


def next_part_index(store: Store, shard: int, attempt: int) -> int:
    """First unused part index of ``attempt``: names are never reused, even across passes
    or when an attempt number comes back after a lost status."""
    prefix = layout.part_name(attempt, 0)[:6]
    used = [
        int(key.rsplit("-", 1)[-1].split(".", 1)[0])
        for base in (layout.shard_parts(shard), layout.shard_commits(shard))
        for key in store.list(base)
        if key.rsplit("/", 1)[-1].startswith(prefix)
    ]
    return max(used, default=-1) + 1


def discard_parts(store: Store, shard: int) -> None:
    """Once the shard file and its manifest exist, the parts are only a second copy."""
    for prefix in (layout.shard_commits(shard), layout.shard_parts(shard)):
        for key in list(store.list(prefix)):
            store.delete(key)


def discard_part(store: Store, shard: int, name: str) -> None:
    """Remove one part and its commit record (record first: a part without one never counts)."""
    store.delete(layout.commit_key(shard, name))
    store.delete(layout.part_key(shard, name))


def discard_attempt(store: Store, shard: int, attempt: int) -> int:
    """A late writer's cleanup once the shard is published: its own parts and records only."""
    prefix = layout.part_name(attempt, 0)[:6]
    names = {
        key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for base in (layout.shard_commits(shard), layout.shard_parts(shard))
        for key in store.list(base)
        if key.rsplit("/", 1)[-1].startswith(prefix)
    }
    for name in sorted(names):
        discard_part(store, shard, name)
    return len(names)


def owns_progress(store: Store, shard: int, attempt: int) -> bool:
    """Whether ``attempt`` may write progress.json: not once the shard is published, and not
    over a newer attempt's report."""
    if store.exists(layout.shard_done(shard)):
        return False
    try:
        recorded = json.loads(store.read_bytes(layout.shard_progress(shard))).get("attempt", -1)
    except ObjectNotFound:
        return True
    except (ValueError, AttributeError):
        return True  # an unreadable report is replaced
    return not isinstance(recorded, int) or recorded <= attempt


# --- writing --------------------------------------------------------------------------------


@dataclass
class ProgressState:
    """What progress.json reports; updated by the upload threads under a lock."""

    shard: int
    attempt: int
    total: int
    committed: int
    parts: int
    started: float
    committed_at_start: int
    batch_tokens: int
    precision: str
    quarantined: int = 0
    reported_at: float = 0.0
    """When progress.json was last written (its ``updated``); the heartbeat carries it too."""

    def document(self, extra: dict[str, object]) -> bytes:
        self.reported_at = time.time()
        elapsed = max(self.reported_at - self.started, 1e-6)
        new = self.committed - self.committed_at_start
        record = ShardProgress(shard=self.shard, attempt=self.attempt, total=self.total,
                               done=self.committed, parts=self.parts, rate=new / elapsed,
                               updated=from_epoch(self.reported_at))
        return progress_document(record, batch_tokens=self.batch_tokens,
                                 precision=self.precision, quarantined=self.quarantined,
                                 extra=extra)


class PartWriter:
    """Buffers results and commits them as parts in the background.

    At most ``max_in_flight`` parts are being uploaded at once; ``flush`` blocks beyond
    that, which keeps host memory flat when the store is slower than the model.
    """

    def __init__(
        self,
        store: Store,
        progress: ProgressState,
        *,
        every_sequences: int,
        every_seconds: float,
        max_in_flight: int = 2,
        extra_progress: Callable[[], dict[str, object]] = dict,
        first_index: int = 0,
    ) -> None:
        self.store, self.progress = store, progress
        self.every_sequences, self.every_seconds = every_sequences, every_seconds
        self.extra_progress = extra_progress
        self._buffer: list[tuple[np.ndarray, list[str], np.ndarray]] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._next_index = first_index
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="upload")
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()

    @property
    def committed(self) -> int:
        with self._lock:
            return self.progress.committed

    def add(self, positions: np.ndarray, ids: list[str], embeddings: np.ndarray) -> None:
        self._raise_upload_error()
        self._buffer.append((positions, ids, embeddings))
        self._buffered += len(ids)

    def due(self) -> bool:
        waited = time.monotonic() - self._last_flush
        return self._buffered >= self.every_sequences or (
            self._buffered > 0 and waited >= self.every_seconds
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Hand the buffered rows to an upload thread as one part; False if no upload slot
        freed up within ``timeout`` (the rows are then not saved)."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return True
        if not self._slots.acquire(timeout=timeout):
            log("checkpoint.abandoned", sequences=self._buffered, reason="uploads too slow")
            return False
        positions = np.concatenate([b[0] for b in self._buffer])
        ids = [i for b in self._buffer for i in b[1]]
        embeddings = np.concatenate([b[2] for b in self._buffer])
        self._buffer, self._buffered = [], 0
        name = layout.part_name(self.progress.attempt, self._next_index)
        self._next_index += 1
        self._futures.append(self._pool.submit(self._commit, name, positions, ids, embeddings))
        self._raise_upload_error()
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush and wait for every upload; False if some did not finish in time.

        The deadline covers the whole close, waiting for an upload slot included."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        queued = True
        try:
            queued = self.flush(left())
        except EmbedjobError as err:
            log("checkpoint.failed", error=str(err))
        finished, pending = wait(self._futures, timeout=left())
        self._pool.shutdown(wait=False, cancel_futures=True)
        failed = [f.exception() for f in finished if f.exception() is not None]
        for err in failed:
            log("checkpoint.failed", error=str(err))
        return queued and not pending and not failed

    def _commit(self, name: str, positions: np.ndarray, ids: list[str], emb: np.ndarray) -> None:
        try:
            data = encode_part(positions, ids, emb)
            shard = self.progress.shard
            # Create-once: a reused name must fail loudly, never replace a committed part.
            if not self.store.create_bytes(layout.part_key(shard, name), data):
                raise StorageError(f"part {name} of shard {shard} already exists: "
                                   "two workers run with the same attempt number")
            rec = CommitRecord(name, self.progress.attempt, len(ids),
                               hashlib.sha256(data).hexdigest(), len(data))
            self.store.create_bytes(layout.commit_key(shard, name), rec.to_json())
            if self.store.exists(layout.shard_done(shard)):
                # A newer attempt published while this part was in flight. It lists and
                # deletes parts after writing done.json, this check runs after the commit:
                # one of the two always sees the other, so no part outlives the shard.
                discard_part(self.store, shard, name)
                log("checkpoint.late", part=name, note="shard already published; part removed")
                return
            with self._lock:  # serialised, so progress.json never goes backwards
                self.progress.committed += len(ids)
                self.progress.parts += 1
                doc = self.progress.document(self.extra_progress())
                try:  # progress.json is a report; the commit record above is the truth
                    self._report(doc)
                except StorageError as err:
                    log("progress.write_failed", error=str(err))
            log("checkpoint.committed", part=name, sequences=len(ids),
                committed=self.progress.committed, total=self.progress.total)
        finally:
            self._slots.release()

    def write_progress(self) -> None:
        with self._lock:
            doc = self.progress.document(self.extra_progress())
        self._report(doc)

    def _report(self, doc: bytes) -> None:
        """Write progress.json unless the shard is published or a newer attempt reports:
        a late writer never overwrites the newer attempt's view."""
        if owns_progress(self.store, self.progress.shard, self.progress.attempt):
            self.store.write_bytes(layout.shard_progress(self.progress.shard), doc)
        else:
            log("progress.skipped", reason="a newer attempt reports or the shard is published")

    def _raise_upload_error(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        self._futures = [f for f in self._futures if not f.done()]
