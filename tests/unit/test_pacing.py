"""How the operator's loops share the event loop (operator.pacing)."""

from __future__ import annotations

import asyncio
import copy
import gc
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
from operator_helpers import job_body

from embedjob.operator.pacing import (
    MAX_GAP_SECONDS,
    MIN_GAP_SECONDS,
    CollectorClock,
    CpuWait,
    LagProbe,
    each,
    off_loop,
    pass_gap,
    pass_running_for,
    wakes,
)


def _seen(body: dict) -> tuple:
    wake, key = wakes(None, body)
    assert wake  # the first sight of a job always wakes it
    return key


def test_our_own_status_patch_does_not_wake_the_loop() -> None:
    body = job_body({"phase": "Running", "shardsReady": "0/3"})
    key = _seen(body)
    patched = copy.deepcopy(body)
    patched["status"] = {"phase": "Running", "shardsReady": "2/3", "shardsDone": "0-1"}
    patched["metadata"]["resourceVersion"] = "42"
    patched["metadata"]["managedFields"] = [{"manager": "embedjob"}]
    patched["metadata"]["finalizers"] = ["embedjob.io/finalizer"]
    patched["metadata"]["annotations"] = {"embedjob.io/last-handled-configuration": "{}"}
    assert wakes(key, patched) == (False, key)


@pytest.mark.parametrize("change", [
    lambda m: m.update(generation=2),  # the spec changed (suspend, parallelism, ...)
    lambda m: m.setdefault("labels", {}).update(team="a"),
    lambda m: m.setdefault("annotations", {}).update(note="x"),
    lambda m: m.update(deletionTimestamp="2025-01-01T00:00:00Z"),
], ids=["generation", "labels", "annotations", "deletion"])
def test_what_someone_else_changed_wakes_the_loop(change) -> None:
    body = job_body({"phase": "Running"})
    key = _seen(body)
    changed = copy.deepcopy(body)
    change(changed["metadata"])
    wake, new = wakes(key, changed)
    assert wake and new != key


def test_the_gap_after_a_pass_scales_with_its_cost() -> None:
    assert pass_gap(0.0) == MIN_GAP_SECONDS
    assert pass_gap(0.1) > pass_gap(0.05) > MIN_GAP_SECONDS
    assert pass_gap(100.0) == MAX_GAP_SECONDS


def test_the_lag_probe_sees_a_blocked_loop() -> None:
    seen: list[float] = []

    async def main() -> LagProbe:
        probe = LagProbe(lambda lag, worst, cpu_wait, own: seen.append(worst), interval=0.01)
        probe.start()
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # something holds the event loop
        await asyncio.sleep(0.05)
        assert probe.task is not None
        probe.task.cancel()
        return probe

    probe = asyncio.run(main())
    worst = probe.worst
    assert worst >= 0.2 and seen[-1] == worst
    # The loop slept in a callback (not runnable, not waiting for a CPU): its own block.
    assert 0.2 <= probe.worst_own <= worst


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="Linux only")
def test_cpu_wait_counts_the_time_a_thread_waits_for_a_cpu() -> None:
    """Twice as many busy processes as CPUs: this thread, runnable, must wait its turn."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 * (os.cpu_count() or 1))]
    try:
        with CpuWait() as wait:
            before = wait.seconds()
            end = time.monotonic() + 1.0
            while time.monotonic() < end:  # runnable throughout
                pass
            waited = wait.seconds() - before
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert 0.05 < waited < 1.0


class _Node:
    other: object = None


def test_the_collector_clock_frees_cycles_without_the_allocation_count() -> None:
    freed = threading.Event()
    gc.disable()  # no count-driven collection: only the clock's
    try:
        node = _Node()
        node.other = node
        weakref.finalize(node, freed.set)
        del node
        assert not freed.is_set()  # a cycle: reference counting alone never frees it
        clock = CollectorClock(interval=0.01, middle_every=2).start()
        try:
            assert freed.wait(10.0)
        finally:
            clock.stop()
    finally:
        gc.enable()
    assert clock.ticks >= 1


@pytest.mark.parametrize(("busy", "collects"), [(0.0, True), (0.5, False), (5.0, True)])
def test_the_collector_clock_waits_for_a_pass(busy, collects) -> None:
    """A pass in progress (for less than the limit) has its objects spared every collection;
    idle, or a pass running too long, and young and middle ones come on the clock."""
    clock = CollectorClock(interval=0.005, middle_every=2, busy_for=lambda: busy).start()
    try:  # a busy clock is watched for 0.2 s; a free one until it ticked (a loaded machine)
        deadline = time.monotonic() + (10.0 if collects else 0.2)
        while clock.ticks < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        clock.stop()
    assert (clock.ticks >= 10) is collects
    assert (clock.middles > 0) is collects


def test_no_collection_during_a_pass() -> None:
    """Off the loop the collector is off, and on again afterwards, also after an error."""

    def fail() -> None:
        raise ValueError("the pass failed")

    async def passes() -> tuple[bool, float]:
        during = await off_loop(gc.isenabled)
        busy = await off_loop(pass_running_for)
        with pytest.raises(ValueError, match="the pass failed"):
            await off_loop(fail)
        return during, busy

    during, busy = asyncio.run(passes())
    assert during is False and busy > 0.0
    assert gc.isenabled() and pass_running_for() == 0.0


def test_each_keeps_order_and_errors_in_place_with_few_tasks() -> None:
    running, most = 0, 0

    async def call(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001 * (i % 3))
        running -= 1
        if i == 5:
            raise ValueError("five")
        return i * 10

    async def main() -> tuple[list, int]:
        tasks = len(asyncio.all_tasks())
        pending = asyncio.ensure_future(each(call, list(range(20)), 4))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        spawned = len(asyncio.all_tasks()) - tasks - 1
        return await pending, spawned

    results, spawned = asyncio.run(main())
    assert [r for r in results if not isinstance(r, Exception)] == [
        i * 10 for i in range(20) if i != 5]
    assert isinstance(results[5], ValueError) and most == 4 and spawned == 4
    assert asyncio.run(each(call, [], 4)) == []
