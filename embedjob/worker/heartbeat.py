"""The worker's heartbeat and its stop handling, stage by stage.

Liveness is reported by forward passes, not by commits: every pass bumps a counter, and a
background thread writes ``heartbeats/NNNNN.json`` only when the counter moved (so a new
ETag means a moved beat: the operator lists them), at most once every ``interval`` seconds
(one small PUT per interval on S3, never one per pass). During the stages spent in one long
call (model load, resume, publish) the thread beats by itself.

SIGTERM/SIGINT: during those long stages nothing is buffered, so the handler stops the
worker at once (:class:`Interrupted`); while embedding it sets the stop flag, checked before
every forward pass, and the worker saves what it embedded before leaving.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from embedjob import layout
from embedjob.failures import Preempted, StorageError, TerminationMessage, write_termination_message
from embedjob.liveness import SLOW_STAGES, beat_interval
from embedjob.logs import log
from embedjob.progress import HeartbeatRecord, heartbeat_document
from embedjob.store import Store
from embedjob.worker.failpoints import Failpoints

if TYPE_CHECKING:
    from embedjob.worker.checkpoint import ProgressState


class Interrupted(BaseException):  # like KeyboardInterrupt: not an Exception
    """A stop signal during a stage with nothing to save; broad ``except Exception`` in
    storage retry loops must not swallow it."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class Heartbeat:
    """Counters the main thread bumps cheaply, written to the store by a background thread."""

    def __init__(self, store: Store, shard: int, attempt: int,
                 interval: float | None = None) -> None:
        self.store, self.shard, self.attempt = store, shard, attempt
        env = os.environ.get("EMBEDJOB_HEARTBEAT_SECONDS")
        self.interval = interval or (float(env) if env else beat_interval(store.uri))
        self.stage = "starting"
        self.beats = 0
        self.passes = 0
        self.slowest = 0.0
        self.embedded = 0
        self.committed_at_start = 0
        self.embed_started: float | None = None
        self.progress: ProgressState | None = None
        """What progress.json reports: the heartbeat carries it, so that a reader needs one
        object per shard (the operator reads heartbeat.json only)."""
        self._last_pass: float | None = None
        self._written = -1
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def close(self) -> None:
        self._done.set()

    def set_stage(self, stage: str) -> None:
        with self._lock:
            if stage != self.stage:  # pass times are measured within one stage only
                self._last_pass = None
            self.stage, self.beats = stage, self.beats + 1

    def embedding(self, committed: int, progress: ProgressState | None = None) -> None:
        """A pass over the shard starts: count what was committed before it."""
        with self._lock:
            self.committed_at_start = committed
            self.progress = progress or self.progress
            self.embed_started = self.embed_started or time.time()
        self.set_stage("embedding")
        with self._lock:  # the first pass is timed from here: a slow first batch counts
            self._last_pass = time.monotonic()

    def forward_pass(self) -> None:
        """Called before each forward pass: the time since the last one is a pass time."""
        now = time.monotonic()
        with self._lock:
            if self._last_pass is not None:
                self.slowest = max(self.slowest, now - self._last_pass)
            self._last_pass, self.passes, self.beats = now, self.passes + 1, self.beats + 1

    def rows_embedded(self, count: int) -> None:
        with self._lock:
            self.embedded += count

    def document(self) -> bytes:
        with self._lock:
            elapsed = time.time() - self.embed_started if self.embed_started else 0.0
            record = HeartbeatRecord(
                attempt=self.attempt, stage=self.stage, beat=self.beats, passes=self.passes,
                slowest_pass=self.slowest, embedded=self.embedded,
                committed_at_start=self.committed_at_start,
                rate=self.embedded / elapsed if elapsed > 0 else 0.0, time=time.time(),
                interval=self.interval, **self._committed(),
            )
        return heartbeat_document(record)

    def _committed(self) -> dict[str, Any]:
        """progress.json's fields (plain reads: a report, updated by the upload threads)."""
        p = self.progress
        if p is None:
            return {}
        return {"done": p.committed, "total": p.total, "updated": p.reported_at or None}

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            with self._lock:
                if self.stage in SLOW_STAGES:
                    self.beats += 1  # one long call: the process is alive, nothing else to say
                beats = self.beats
            if beats == self._written:
                continue  # no forward pass since the last write: stay silent
            try:
                self.store.write_bytes(layout.shard_heartbeat(self.shard), self.document())
                self._written = beats
            except StorageError as err:  # a report, not the truth; the next interval tries again
                log("heartbeat.write_failed", error=str(err))


class Stopper:
    """The worker's stop flag plus the stage it is in (decides how a signal is honoured)."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.stage = "starting"
        self.heartbeat: Heartbeat | None = None
        self.failpoints = Failpoints([], -1, -1)
        self.deadline = 20.0
        """Seconds from the signal to the exit, whatever the worker is doing."""
        self._backstop: threading.Timer | None = None

    def install(self) -> Stopper:
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, _signum: int, _frame: object) -> None:
        # Only set the flag or raise: writing to stderr here can hit a reentrant-write
        # RuntimeError when the signal lands while the main thread is itself logging.
        self.flag.set()
        if self.stage != "embedding":
            raise Interrupted(self.stage)
        if self._backstop is None:  # a forward pass cannot be cut short: bound the wait
            self._backstop = threading.Timer(self.deadline, _past_deadline, (self.deadline,))
            self._backstop.daemon = True
            self._backstop.start()

    @contextmanager
    def stage_of(self, stage: str) -> Iterator[None]:
        """Run a block as ``stage``: a signal during a long stage interrupts it at once."""
        previous = self.stage
        self.enter(stage)
        try:
            yield
        finally:
            self.stage = previous

    def enter(self, stage: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.set_stage(stage)
        self.stage = stage
        if self.flag.is_set() and stage != "embedding":
            raise Interrupted(stage)  # the signal came between two stages
        self.failpoints.at("stage", stage)

    def before_forward(self) -> None:
        """Hook run before every forward pass: a beat, and the stop check between passes."""
        if self.heartbeat is not None:
            self.heartbeat.forward_pass()
            self.failpoints.at("pass", self.heartbeat.passes - 1)
        if self.flag.is_set():
            raise Preempted("stopped by signal during a batch; finished batches saved")


def _past_deadline(deadline: float) -> None:
    """The shutdown deadline passed inside one forward pass: leave now. Committed parts are
    safe; a part whose commit record was not written yet never counts."""
    write_termination_message(TerminationMessage(
        type=Preempted.failure.value,
        message=f"stopped by signal: a forward pass outlasted the {deadline:g}s shutdown "
                "deadline; committed work is kept",
    ))
    log("worker.deadline_passed", deadline=deadline)
    os._exit(Preempted.exit_code)
