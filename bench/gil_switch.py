"""How long an event loop that does socket I/O waits for the GIL beside CPU-bound threads.

    python bench/gil_switch.py [--seconds 10] [--threads 0,1,2] [--intervals 5,1,0.5]

The operator's loop gives the GIL up around every socket call (each send and receive of
its API calls) and must win it back from whatever thread took it meanwhile: CPython makes
the holder drop it only after the waiter has waited ``sys.getswitchinterval()``, and with two
CPU-bound threads passing it between themselves the loop may lose many such rounds (a waiter
asks for a drop only if nobody switched meanwhile). Here a loop ping-pongs small messages
over a socket pair (20 socket calls per turn) beside N threads running pure-Python
arithmetic; a task sleeping 50 ms records how late it wakes. Printed per thread count and
switch interval: the longest, p99 and median lateness, and the ratio of the longest to the
interpreter's default (5 ms) in the same run. This is why the pass is the operator's only
CPU-bound thread (the pod watch runs in a child process) and why ``pacing.tune_interpreter``
sets a shorter interval.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time

DEFAULT_INTERVAL = 0.005
TICK = 0.05


def burn(stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i * i


async def ping_pong() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        while True:
            for _ in range(10):
                await loop.sock_sendall(a, b"x" * 100)
                await loop.sock_recv(b, 100)
            await asyncio.sleep(0.001)
    finally:
        a.close()
        b.close()


async def lateness(seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    worker = asyncio.create_task(ping_pong())
    late: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        before = loop.time()
        await asyncio.sleep(TICK)
        late.append(max(0.0, loop.time() - before - TICK))
    worker.cancel()
    return sorted(late)


def measure(threads: int, interval: float, seconds: float) -> list[float]:
    stop = threading.Event()
    burners = [threading.Thread(target=burn, args=(stop,), daemon=True) for _ in range(threads)]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        for thread in burners:
            thread.start()
        return asyncio.run(lateness(seconds))
    finally:
        stop.set()
        for thread in burners:
            thread.join()
        sys.setswitchinterval(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", default="0,1,2")
    parser.add_argument("--intervals", default="5,1,0.5", help="switch intervals, ms")
    args = parser.parse_args()
    intervals = [float(v) / 1000 for v in args.intervals.split(",")]
    if DEFAULT_INTERVAL not in intervals:
        intervals.insert(0, DEFAULT_INTERVAL)
    print("| CPU-bound threads | switch interval | longest | p99 | median "
          "| longest vs 5 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for threads in (int(v) for v in args.threads.split(",")):
        reference = None
        for interval in intervals:
            late = measure(threads, interval, args.seconds)
            worst = late[-1]
            reference = worst if interval == DEFAULT_INTERVAL else reference
            ratio = f"{worst / reference:.2f}" if reference else "n/a"
            print(f"| {threads} | {interval * 1000:g} ms | {worst * 1000:.0f} ms "
                  f"| {late[int(len(late) * 0.99)] * 1000:.0f} ms "
                  f"| {late[len(late) // 2] * 1000:.1f} ms | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
