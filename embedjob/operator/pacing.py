"""How the per-job loops share one event loop and the CPU.

* :func:`wake_key` / :func:`wakes`: a change of an EmbeddingJob wakes its loop only when
  someone else changed it (spec, labels, annotations, deletion), never for the status the
  operator itself just wrote. Pure.
* :func:`pass_gap`: the shortest pause after a pass, proportional to what the pass cost, so
  that a 10^4-shard job leaves the CPU to the others between passes. Pure.
* :func:`off_loop`: CPU-bound work of a job's loop (parsing a 10^4-shard status, a pass,
  a status diff, anything O(shards)) in one thread, :data:`PASS_POOL`.
* :func:`each`: API calls over many pods, a few at a time, from a few tasks.
* :class:`LagProbe`: a task that sleeps 50 ms and records how late it wakes (the longest
  event-loop block), exported as metrics.
* :func:`tune_interpreter`, :class:`CollectorClock`: fewer, and shorter, pauses of the
  garbage collector, and a short GIL switch interval.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from embedjob.spec import API_GROUP

KOPF_ANNOTATIONS = frozenset({f"{API_GROUP}/last-handled-configuration"})
"""Annotations kopf itself writes on the job (its diff base): not a reason to wake."""
GAP_FACTOR = 2.0
"""A pass that cost c seconds of CPU is followed by at least GAP_FACTOR * c seconds of
rest: one job takes at most 1 / (1 + GAP_FACTOR) of a core."""
MIN_GAP_SECONDS = 0.05
"""Lets a burst of pod events land before the next pass (the debounce)."""
MAX_GAP_SECONDS = 5.0
LAG_INTERVAL_SECONDS = 0.05
PASS_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedjob-reconcile")
"""Reconcile passes run here, off the event loop: one thread (the GIL would serialise more),
so jobs' passes queue instead of contending, and the pure code's caches see one caller."""
T = TypeVar("T")
A = TypeVar("A")


def wake_key(body: Mapping[str, Any],
             ignore: Collection[str] = KOPF_ANNOTATIONS) -> tuple[Any, ...]:
    """What of a job's body the operator does not write itself: generation (the spec),
    labels, annotations (but kopf's own), deletion. Its status is ours: not in the key."""
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return (
        meta.get("generation"),
        tuple(sorted((meta.get("labels") or {}).items())),
        tuple(sorted((k, v) for k, v in annotations.items() if k not in ignore)),
        meta.get("deletionTimestamp"),
    )


def wakes(before: tuple[Any, ...] | None, body: Mapping[str, Any]) -> tuple[bool, tuple]:
    """Whether this change of the job should wake its loop, and the key to remember."""
    key = wake_key(body)
    return key != before, key


async def off_loop(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in :data:`PASS_POOL`: the event loop keeps serving watches and /healthz
    meanwhile. Everything of one job's loop that is O(shards) goes through here."""
    return await asyncio.get_running_loop().run_in_executor(PASS_POOL, _in_pass, func, *args)


_pass_since: float | None = None
"""When the work now in :data:`PASS_POOL` began (None: idle); read by the collector clock."""


def _in_pass(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` with no collection until it returns: a pass's temporaries (~50,000
    objects at 10^4 shards) are freed by reference counting when it ends, and a collection
    meanwhile would walk them all, then again in the middle generation it promoted them to.
    The :class:`CollectorClock` stays off too, for at most :data:`PASS_SPARED_SECONDS`."""
    global _pass_since
    _pass_since = time.monotonic()
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return func(*args)
    finally:
        _pass_since = None
        if paused:
            gc.enable()


def pass_running_for() -> float:
    """Seconds the work in :data:`PASS_POOL` has run, 0 when there is none."""
    since = _pass_since
    return 0.0 if since is None else time.monotonic() - since


async def each(func: Callable[[A], Awaitable[T]], items: Sequence[A], limit: int
               ) -> list[T | Exception]:
    """``func`` over ``items``, at most ``limit`` at once; results in order, an error in its
    item's place (as ``gather(..., return_exceptions=True)``). ``limit`` tasks, not one per
    item: a chunk of 1,000 pending creates would be ~10,000 objects (tasks, coroutines,
    contexts) for the collector to walk while the chunk lasts."""
    results: list[Any] = [None] * len(items)  # every slot is filled before it returns
    order = iter(range(len(items)))

    async def worker() -> None:
        for i in order:
            try:
                results[i] = await func(items[i])
            except Exception as err:  # handed back, as gather does
                results[i] = err

    await asyncio.gather(*(worker() for _ in range(min(limit, len(items)))))
    return results


def pass_gap(cost_seconds: float) -> float:
    """The pause after a pass that cost ``cost_seconds`` of CPU."""
    return min(MAX_GAP_SECONDS, max(MIN_GAP_SECONDS, GAP_FACTOR * cost_seconds))


class LagProbe:
    """Sleeps :data:`LAG_INTERVAL_SECONDS` over and over; how much later than asked it
    wakes is how long something else held the event loop, or how long its thread waited
    for a CPU (:class:`CpuWait`: runnable, not running; the node's other work or the pod's
    CPU limit, not the operator). ``observe(lag, worst, worst_cpu_wait, worst_own)``: each
    lag, the longest so far, how much of that longest was CPU wait, and the longest lag
    less its CPU wait (what held the loop in the operator: its callbacks, the GIL, a
    collection)."""

    def __init__(self, observe: Callable[[float, float, float, float], object],
                 interval: float = LAG_INTERVAL_SECONDS) -> None:
        self.observe = observe
        self.interval = interval
        self.worst = self.worst_cpu_wait = self.worst_own = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run(), name="lag-probe")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with CpuWait() as cpu_wait:  # opened here: the loop's own thread
            while True:
                before, waited = loop.time(), cpu_wait.seconds()
                await asyncio.sleep(self.interval)
                lag = max(0.0, loop.time() - before - self.interval)
                waiting = min(lag, cpu_wait.seconds() - waited)
                if lag > self.worst:
                    self.worst, self.worst_cpu_wait = lag, waiting
                self.worst_own = max(self.worst_own, lag - waiting)
                self.observe(lag, self.worst, self.worst_cpu_wait, self.worst_own)


class CpuWait:
    """Seconds the calling thread has spent runnable but not running (Linux's
    ``/proc/thread-self/schedstat``, second field); always 0 where there is none."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def seconds(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def __enter__(self) -> CpuWait:
        return self

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


GC_THRESHOLDS = (2_000, 100, 1_000)
"""Young, middle, full. The middle threshold is only a fallback: :class:`CollectorClock`
makes the middle collections."""
YOUNG_EVERY_SECONDS = 0.05
MIDDLE_EVERY = 10
"""A middle collection instead of every MIDDLE_EVERY-th young one (twice a second)."""
SWITCH_INTERVAL_SECONDS = 0.0005
"""How long the event loop waits for the GIL before the pass thread must hand it over
(CPython's default is 5 ms). The loop gives the GIL up around every socket call and waits
this long to win it back, several times a turn: bench/gil_switch.py measures a loop beside
one CPU-bound thread waking up to 109 ms late at 5 ms, 8 ms at 0.5 ms."""
PASS_SPARED_SECONDS = 2.0
"""No collection while a pass runs, unless it has run longer than this (a first pass over
a 10^4-shard status); then the clock goes on, and cycles made meanwhile are found."""


def tune_interpreter() -> None:
    """Collector thresholds for a latency-bound loop beside passes that allocate ~10^5
    objects; call before the loop starts (its own full collection takes ~100 ms). A
    collection stops every thread, so its pause is what the loop waits: full ones only
    after 1,000 middle ones (the defaults made them half of a 10^4-pod pass; reference
    counting frees the operator's acyclic data); the young and middle ones are kept small by
    a :class:`CollectorClock` (the operator starts one). Then the GIL switch interval
    (:data:`SWITCH_INTERVAL_SECONDS`). The measurements behind them are in
    docs/operator.md."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


class CollectorClock:
    """Young collections every :data:`YOUNG_EVERY_SECONDS`, a middle one every
    :data:`MIDDLE_EVERY`-th time, in a daemon thread.

    CPython 3.11 starts a young collection when its count of allocations minus frees passes
    the threshold, but frees of *old* objects count too: while passes and watch events
    replace long-lived data, the young generation grew to 10,000-50,000 objects between
    collections and the middle one to 80,000 (a ``gc.callbacks`` probe in the 100-job
    bench), pauses of 30-230 ms. On a clock, each collection holds what survived 50 ms.
    ``busy_for``: how long the pass in progress has run (0: none); the clock waits for it
    (see :func:`off_loop`), so a middle collection holds half a second of survivors, never a
    pass's temporaries.
    """

    def __init__(self, interval: float = YOUNG_EVERY_SECONDS, middle_every: int = MIDDLE_EVERY,
                 busy_for: Callable[[], float] = pass_running_for) -> None:
        self.interval, self.middle_every, self.busy_for = interval, middle_every, busy_for
        self._stop = threading.Event()
        self.ticks = 0
        self.middles = 0

    def start(self) -> CollectorClock:
        threading.Thread(target=self._run, daemon=True, name="embedjob-gc-clock").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        since_middle = 0
        while not self._stop.wait(self.interval):
            if 0.0 < self.busy_for() < PASS_SPARED_SECONDS:
                continue  # the pass's objects die with it: walking them now is waste
            self.ticks += 1
            since_middle += 1
            if since_middle >= self.middle_every:
                gc.collect(1)
                self.middles += 1
                since_middle = 0
            else:
                gc.collect(0)
