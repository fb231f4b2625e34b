"""The informer's hand-over from its threads to the event loop (LoopQueue): a burst of watch
events is one loop wake-up, and nothing put is lost or reordered."""

from __future__ import annotations

import asyncio
import threading

import pytest

from embedjob.operator.informer import LoopQueue


@pytest.mark.asyncio
async def test_a_burst_from_a_thread_is_one_batch_in_order() -> None:
    got: list[list[int]] = []
    queue: LoopQueue[int] = LoopQueue(asyncio.get_running_loop(), got.append)
    # The loop is busy (this coroutine does not yield) while the thread puts 100 items.
    thread = threading.Thread(target=lambda: [queue.put(i) for i in range(100)])
    thread.start()
    thread.join()
    assert got == []  # nothing runs on another thread's stack
    await asyncio.sleep(0)
    assert got == [list(range(100))] and queue.drains == 1


@pytest.mark.asyncio
async def test_items_after_a_drain_schedule_the_next_one() -> None:
    got: list[list[str]] = []
    queue: LoopQueue[str] = LoopQueue(asyncio.get_running_loop(), got.append)
    queue.put("a")
    await asyncio.sleep(0)
    queue.put("b")
    queue.put("c")
    await asyncio.sleep(0)
    assert got == [["a"], ["b", "c"]] and queue.drains == 2
    await asyncio.sleep(0)
    assert queue.drains == 2  # no empty batch
