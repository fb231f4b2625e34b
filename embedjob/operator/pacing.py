"""How the per-job loops share one event loop and the CPU.

* :func:`wake_key` / :func:`wakes`: a change of an EmbeddingJob wakes its loop only when
  someone else changed it (spec, labels, annotations, deletion), never for the status the
  operator itself just wrote. Pure.
* :func:`pass_gap`: the shortest pause after a pass, proportional to what the pass cost, so
  that a 10^4-shard job leaves the CPU to the others between passes. Pure.
* :func:`off_loop`: CPU-bound work of a job's loop (parsing a 10^4-shard status, a pass,
  a status diff, anything O(shards)) in one thread, :data:`PASS_POOL`.
* :class:`LagProbe`: a task that sleeps 50 ms and records how late it wakes (the longest
  event-loop block), exported as metrics.
* :func:`tune_interpreter`: fewer, and shorter, pauses of the garbage collector.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Collection, Mapping
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
    return await asyncio.get_running_loop().run_in_executor(PASS_POOL, func, *args)


def pass_gap(cost_seconds: float) -> float:
    """The pause after a pass that cost ``cost_seconds`` of CPU."""
    return min(MAX_GAP_SECONDS, max(MIN_GAP_SECONDS, GAP_FACTOR * cost_seconds))


class LagProbe:
    """Sleeps :data:`LAG_INTERVAL_SECONDS` over and over; how much later than asked it
    wakes is how long something else held the event loop."""

    def __init__(self, observe: Any, interval: float = LAG_INTERVAL_SECONDS) -> None:
        self.observe = observe  # called with each lag, in seconds
        self.interval = interval
        self.worst = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run(), name="lag-probe")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - before - self.interval)
            self.worst = max(self.worst, lag)
            self.observe(lag, self.worst)


GC_THRESHOLDS = (2_000, 10, 1_000)


def tune_interpreter() -> None:
    """Collector thresholds for a latency-bound loop beside passes that allocate ~10^5
    objects; call before the loop starts (its own full collection takes ~100 ms). A
    collection stops every thread, so the thresholds bound the longest pause: full ones only
    every ~2 x 10^7 allocations (the defaults made them half of a 10^4-pod pass; reference
    counting frees the operator's acyclic data), young and middle ones of at most 2,000 and
    20,000 objects. The measurements behind them are in docs/operator.md."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
