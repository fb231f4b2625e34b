"""The operator's storage reads for liveness and progress: requests a minute, how often each
running shard is looked at, and worst-case stuck detection — three designs side by side:
every shard's heartbeat GET every poll (the first), one budgeted GET per shard per round
(the last release), and a LIST of each job's heartbeats/ plus a GET only of the heartbeats
that changed (now).

Two parts, printed as tables:

1. The schedule (embedjob/operator/read_schedule.py) on a simulated clock, for N running
   shards up to 100 jobs x 10,000 shards, every worker beating (each listing finds every
   heartbeat changed) and every worker silent: requests counted over simulated minutes.
2. The real poller (threads, a file store whose heartbeat files a thread keeps rewriting)
   for a few hundred shards over ``--seconds`` of wall time under a small budget: requests
   counted by the poller's own metric (embedjob_storage_requests_total), by kind.

    python bench/storage_budget.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter

from embedjob import layout
from embedjob.operator import metrics
from embedjob.operator.config import OperatorSettings
from embedjob.operator.poller import Poller
from embedjob.operator.read_schedule import HEARTBEAT, LISTING, ReadSchedule
from embedjob.operator.storage_access import Stores, job_storage
from embedjob.progress import HeartbeatRecord, heartbeat_document
from embedjob.spec import parse_spec
from embedjob.store import open_store

GET_PRICE = 0.0004 / 1000  # S3 standard, USD per GET
LIST_PRICE = 0.005 / 1000  # S3 standard, USD per LIST
POLL = 30.0
BUDGET = 6000.0
STUCK_AFTER = 1800.0


def simulate(jobs: int, shards: int, moving: bool, minutes: float) -> tuple[Counter[str], float]:
    """(requests a minute by kind, listing interval) of the schedule on a simulated clock."""
    schedule = ReadSchedule(BUDGET, POLL, now=0.0)
    for j in range(jobs):
        schedule.track(f"job{j}", dict.fromkeys(range(shards), 0))
    count: Counter[str] = Counter()
    t, step = 0.0, 0.25
    while t < minutes * 60:
        for read in schedule.take(t, 1_000_000):
            schedule.done(read, t)
            count[read.kind] += read.cost
            if moving and read.kind == LISTING:
                schedule.changed(read.job, range(shards))
        t += step
    return Counter({k: v / minutes for k, v in count.items()}), schedule.interval()


def part_one() -> None:
    print("1. schedule, simulated; budget storageRequestsPerMinute="
          f"{BUDGET:.0f}, progressPollSeconds={POLL:.0f}, stuckAfterSeconds={STUCK_AFTER:.0f}")
    head = ("running shards", "every poll: GET/min", "budgeted GET: req/min",
            "budgeted GET: stuck seen within", "listing: req/min beating (LIST+GET)",
            "listing: req/min silent", "listing: $/day beating", "listing: progress read every",
            "listing: stuck seen within")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for jobs, shards in ((1, 100), (1, 1000), (10, 1000), (1, 10_000), (10, 10_000),
                         (100, 10_000)):
        n = jobs * shards
        old = n * 60 / POLL
        budgeted_interval = max(POLL, n * 60 / BUDGET)  # the last release's schedule
        minutes = 10 if n <= 100_000 else 2
        beating, interval = simulate(jobs, shards, True, minutes)
        silent, _ = simulate(jobs, shards, False, minutes)
        cost = (beating[LISTING] * LIST_PRICE + beating[HEARTBEAT] * GET_PRICE) * 1440
        progress_every = 60 * n / beating[HEARTBEAT] if beating[HEARTBEAT] else float("inf")
        print(f"| {jobs} x {shards:,} | {old:,.0f} | {min(old, BUDGET):,.0f} | "
              f"{_dur(STUCK_AFTER + 2 * budgeted_interval)} | "
              f"{beating[LISTING]:,.0f} + {beating[HEARTBEAT]:,.0f} | {silent.total():,.0f} | "
              f"{cost:,.2f} | {_dur(max(progress_every, interval))} | "
              f"{_dur(STUCK_AFTER + 2 * interval)} |")


def part_two(seconds: float) -> None:
    shards, budget = 400, 1200.0
    settings = OperatorSettings(progress_poll_seconds=1.0, storage_requests_per_minute=budget)
    with tempfile.TemporaryDirectory() as out:
        store = open_store(out)
        stop = threading.Event()

        def beat() -> None:  # every worker beating: every heartbeat rewritten every second
            value = 0
            while not stop.is_set():
                value += 1
                for s in range(shards):
                    record = HeartbeatRecord(attempt=0, stage="embedding", beat=value, done=1,
                                             total=9)
                    store.write_bytes(layout.shard_heartbeat(s), heartbeat_document(record))
                stop.wait(1.0)

        writer = threading.Thread(target=beat, daemon=True)
        writer.start()
        spec = parse_spec({"input": {"uri": "in.fa"}, "output": {"uri": out}})
        poller = Poller(settings, Stores(settings, lambda ns, name: {})).start()
        for j in range(4):  # four jobs on the same output: 4 x 100 shards
            poller.job(f"j{j}", f"j{j}", job_storage("ns", f"j{j}", spec, settings),
                       lambda: None)
            poller.track(f"j{j}", dict.fromkeys(range(j * 100, (j + 1) * 100), 0))
        before = _requests()
        time.sleep(seconds)
        made = _requests() - before
        stop.set()
        interval = poller.schedule.interval()
    print(f"\n2. real poller (threads, file store, every heartbeat rewritten every second): "
          f"{shards} running shards in 4 jobs, budget {budget:.0f}/min, {seconds:.0f} s")
    print("| shards | budget req/min | measured LIST/min | measured GET/min | listed every |")
    print("|---|---|---|---|---|")
    print(f"| {shards} | {budget:.0f} | {made[LISTING] * 60 / seconds:,.0f} | "
          f"{made[HEARTBEAT] * 60 / seconds:,.0f} | {_dur(interval)} |")


def _requests() -> Counter[str]:
    total: Counter[str] = Counter()
    for metric in metrics.STORAGE_REQUESTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total[sample.labels["kind"]] += sample.value
    return total


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    part_one()
    part_two(args.seconds)


if __name__ == "__main__":
    main()
