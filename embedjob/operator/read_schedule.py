"""Which shard's storage to read next, within an operator-wide budget. No I/O, no threads.

Every running shard of every job is read once per :meth:`ReadSchedule.interval`:
``max(progressPollSeconds, running shards x 60 / storageRequestsPerMinute)``, so the reads
of all jobs together stay within the budget however many shards run, and each shard gets
the same share (a job with more running shards gets proportionally more reads). Order:
attempts that just ended first (their replacement starts from what they committed), then
shards never read, then the least recently read. A token bucket paces the reads so a burst
(a thousand shards starting at once) is spread out instead of spent in one second.
Times are seconds on one monotonic clock, passed in, so tests drive it with a fake one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

HEARTBEAT = "heartbeat"
PROGRESS = "progress"
Key = tuple[str, int]
"""(job uid, shard)."""


@dataclass(frozen=True)
class Read:
    """One storage request to make."""

    job: str
    shard: int
    attempt: int
    kind: str  # HEARTBEAT (a running attempt) | PROGRESS (an attempt that ended)


class ReadSchedule:
    """The shards to read and when; the caller reports each read back with :meth:`done`."""

    def __init__(self, per_minute: float, min_interval: float, now: float) -> None:
        self.rate = per_minute / 60.0  # requests per second
        self.min_interval = min_interval
        self.burst = max(1.0, self.rate)  # at most one second's worth at once
        self.tokens, self.refilled = self.burst, now
        self.running: dict[Key, int] = {}  # -> attempt
        self.last_read: dict[Key, float] = {}
        self._gen: dict[Key, int] = {}  # a key's queue entry is live while its gen matches
        self._fresh: deque[tuple[Key, int]] = deque()  # never read
        self._cycle: deque[tuple[Key, int]] = deque()  # read, oldest first
        self._urgent: deque[Read] = deque()
        self.in_flight: set[Key] = set()

    # --- what to read

    def interval(self) -> float:
        """Seconds between two reads of one running shard."""
        return max(self.min_interval, len(self.running) / self.rate)

    def planned_per_minute(self) -> float:
        """Requests a minute the current shards take at the current interval (<= budget)."""
        return 60.0 * len(self.running) / self.interval() if self.running else 0.0

    def track(self, job: str, running: Mapping[int, int]) -> None:
        """The job's running shards now (shard -> attempt): new ones and new attempts are
        read first; shards no longer running are dropped."""
        for key in [k for k in self.running if k[0] == job and k[1] not in running]:
            self._drop(key)
        for shard, attempt in running.items():
            key = (job, shard)
            if self.running.get(key) != attempt:
                self.running[key] = attempt
                self._queue(self._fresh, key)

    def ended(self, job: str, shards: Iterable[tuple[int, int]]) -> None:
        """Attempts (shard, attempt) that ended: read their progress before anything else."""
        self._urgent.extend(Read(job, s, a, PROGRESS) for s, a in shards)

    def forget(self, job: str) -> None:
        for key in [k for k in self.running if k[0] == job]:
            self._drop(key)
        self._urgent = deque(r for r in self._urgent if r.job != job)

    # --- taking reads

    def take(self, now: float, limit: int) -> list[Read]:
        """Up to ``limit`` reads due now and paid for by the budget."""
        self._refill(now)
        out: list[Read] = []
        while len(out) < limit and self.tokens >= 1.0:
            read = self._next(now)
            if read is None:
                break
            self.tokens -= 1.0
            out.append(read)
        return out

    def done(self, read: Read, now: float) -> None:
        """A read finished (whatever its outcome): the shard goes to the back of the round."""
        if read.kind != HEARTBEAT:
            return
        key = (read.job, read.shard)
        self.in_flight.discard(key)
        if key in self.running:
            self.last_read[key] = now
            self._queue(self._cycle, key)

    def wait(self, now: float) -> float:
        """Seconds until a read may be due (for the reader's sleep)."""
        if self.tokens < 1.0:
            return (1.0 - self.tokens) / self.rate
        if self._urgent or self._live(self._fresh):
            return 0.0
        head = self._live(self._cycle)
        if head is None:
            return self.interval()
        return max(0.0, self.last_read.get(head, now) + self.interval() - now)

    # --- internals

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now

    def _next(self, now: float) -> Read | None:
        if self._urgent:
            return self._urgent.popleft()
        for queue, due in ((self._fresh, True), (self._cycle, False)):
            key = self._live(queue)
            if key is None:
                continue
            if not due and self.last_read.get(key, now) + self.interval() > now:
                continue  # the oldest read is not due: none behind it is
            queue.popleft()
            self.in_flight.add(key)
            return Read(key[0], key[1], self.running[key], HEARTBEAT)
        return None

    def _live(self, queue: deque[tuple[Key, int]]) -> Key | None:
        """The first live key of ``queue`` (stale entries dropped on the way)."""
        while queue:
            key, gen = queue[0]
            if self._gen.get(key) == gen and key in self.running:
                return key
            queue.popleft()
        return None

    def _queue(self, queue: deque[tuple[Key, int]], key: Key) -> None:
        gen = self._gen.get(key, 0) + 1
        self._gen[key] = gen
        queue.append((key, gen))

    def _drop(self, key: Key) -> None:
        self.running.pop(key, None)
        self.last_read.pop(key, None)
        self._gen.pop(key, None)
