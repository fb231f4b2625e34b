"""Which storage requests to make next, within an operator-wide budget. No I/O, no threads.

A job's heartbeats live under one prefix (``heartbeats/``), so one LIST shows 1,000 of them
with their ETags. A round is one *listing* per job with running shards, every
:meth:`ReadSchedule.interval` (``progressPollSeconds``, longer only when the listings alone
would take more than half of ``storageRequestsPerMinute``), and one GET per heartbeat that
changed since it was last read (the poller compares the tags and says which:
:meth:`ReadSchedule.changed`). A silent worker's heartbeat is looked at by every listing and
costs no GET, however many shards run; the GETs of moving ones share what the budget leaves.
Order: attempts that just ended first (their ``progress.json``: the replacement starts from
what they committed), then listings that are due, then changed heartbeats that stopped
changing (a verdict waits for them), then the others in the order they were found. A token
bucket paces it all, so a thousand shards starting at once are spread out. Times are seconds
on one monotonic clock, passed in, so tests drive it with a fake one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LISTING = "listing"
HEARTBEAT = "heartbeat"
PROGRESS = "progress"
PAGE = 1000
"""Keys in one LIST answer (S3's most)."""
LIST_SHARE = 0.5
"""At most this share of the budget goes to listings; GETs of changed heartbeats get the rest."""
Key = tuple[str, int]
"""(job uid, shard)."""


@dataclass(frozen=True)
class Read:
    """One storage request to make (``shard`` and ``attempt`` are -1 for a listing)."""

    job: str
    shard: int
    attempt: int
    kind: str  # LISTING (a job's heartbeats) | HEARTBEAT (one that changed) | PROGRESS
    cost: int = 1
    """Requests it takes from the budget: a listing's pages of :data:`PAGE` keys."""


class ReadSchedule:
    """The requests to make and when; the caller reports each one back with :meth:`done`."""

    def __init__(self, per_minute: float, min_interval: float, now: float) -> None:
        self.rate = per_minute / 60.0  # requests per second
        self.min_interval = min_interval
        self.burst = max(1.0, self.rate)  # at most one second's worth at once
        self.tokens, self.refilled = self.burst, now
        self.running: dict[Key, int] = {}  # -> attempt
        self._jobs: dict[str, set[int]] = {}  # job -> its running shards (jobs with some)
        self._pages = 0  # listing pages of all jobs: sum of ceil(running / PAGE)
        self.listed: dict[str, float] = {}  # job -> when its last listing ended
        self._listing: set[str] = set()  # jobs whose listing is in flight
        self._changed: dict[Key, None] = {}  # heartbeats to GET, in the order found
        self._settled: dict[Key, None] = {}  # ... that stopped changing: GET them first
        self._urgent: deque[Read] = deque()
        self.in_flight: set[Key] = set()

    # --- what to read

    def interval(self) -> float:
        """Seconds between two listings of one job: how late a running shard is looked at."""
        return max(self.min_interval, self._pages / (self.rate * LIST_SHARE))

    def planned_per_minute(self) -> float:
        """Requests a minute at most, at the current interval (<= budget): every listing,
        and a GET of every running shard's heartbeat per listing (all of them moving)."""
        per_listing = self._pages + len(self.running)
        return min(60.0 * self.rate, 60.0 * per_listing / self.interval())

    def track(self, job: str, running: Mapping[int, int]) -> None:
        """The job's running shards now (shard -> attempt); shards no longer running are
        dropped. The job's next listing looks at new ones."""
        for shard in self._jobs.get(job, set()) - running.keys():
            self._drop((job, shard))
        for shard, attempt in running.items():
            self.running[(job, shard)] = attempt
        self._count(job, set(running))

    def changed(self, job: str, shards: Iterable[int]) -> None:
        """Heartbeats a listing found changed since they were last read: GET them."""
        for shard in shards:
            key = (job, shard)
            if key in self.running and key not in self.in_flight:
                self._changed.setdefault(key)

    def settled(self, job: str, shards: Iterable[int]) -> None:
        """Changed heartbeats that stopped changing (two listings saw the same ETag): a
        verdict waits for their GET, so they go before the ones still moving."""
        for shard in shards:
            key = (job, shard)
            if key in self.running and key not in self.in_flight:
                self._changed.pop(key, None)
                self._settled.setdefault(key)

    def ended(self, job: str, shards: Iterable[tuple[int, int]]) -> None:
        """Attempts (shard, attempt) that ended: read their progress before anything else."""
        self._urgent.extend(Read(job, s, a, PROGRESS) for s, a in shards)

    def forget(self, job: str) -> None:
        for shard in self._jobs.get(job, set()):
            self._drop((job, shard))
        self._count(job, set())
        self.listed.pop(job, None)
        self._urgent = deque(r for r in self._urgent if r.job != job)

    # --- taking reads

    def take(self, now: float, limit: int) -> list[Read]:
        """Up to ``limit`` requests due now and paid for by the budget (a listing of several
        pages may overdraw it: the requests after it wait)."""
        self._refill(now)
        out: list[Read] = []
        while len(out) < limit and self.tokens >= 1.0:
            read = self._next(now)
            if read is None:
                break
            self.tokens -= read.cost
            out.append(read)
        return out

    def done(self, read: Read, now: float) -> None:
        """A request finished, whatever its outcome."""
        if read.kind == LISTING:
            self._listing.discard(read.job)
            if read.job in self._jobs:
                self.listed[read.job] = now
        elif read.kind == HEARTBEAT:
            self.in_flight.discard((read.job, read.shard))

    def wait(self, now: float) -> float:
        """Seconds until a request may be due (for the reader's sleep)."""
        if self.tokens < 1.0:
            return (1.0 - self.tokens) / self.rate
        if self._urgent or self._settled or self._changed:
            return 0.0
        due = self._listing_due()
        if due is None:
            return self.interval()
        return max(0.0, self.listed.get(due, -math.inf) + self.interval() - now)

    # --- internals

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now

    def _next(self, now: float) -> Read | None:
        if self._urgent:
            return self._urgent.popleft()
        job = self._listing_due()
        if job is not None and self.listed.get(job, -math.inf) + self.interval() <= now:
            self._listing.add(job)
            return Read(job, -1, -1, LISTING, cost=_pages(len(self._jobs[job])))
        for queue in (self._settled, self._changed):
            while queue:
                key = next(iter(queue))
                del queue[key]
                if key in self.running:
                    self.in_flight.add(key)
                    return Read(key[0], key[1], self.running[key], HEARTBEAT)
        return None

    def _listing_due(self) -> str | None:
        """The job listed longest ago with no listing in flight (O(jobs): a hundred)."""
        waiting = [j for j in self._jobs if j not in self._listing]
        return min(waiting, key=lambda j: self.listed.get(j, -math.inf), default=None)

    def _count(self, job: str, shards: set[int]) -> None:
        self._pages -= _pages(len(self._jobs.pop(job, ())))
        if shards:
            self._jobs[job] = shards
            self._pages += _pages(len(shards))

    def _drop(self, key: Key) -> None:
        self.running.pop(key, None)
        self._changed.pop(key, None)
        self._settled.pop(key, None)


def _pages(running: int) -> int:
    return math.ceil(running / PAGE)
