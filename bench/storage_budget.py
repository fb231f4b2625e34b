"""The operator's storage reads for liveness and progress: requests a minute, per-shard read
interval and worst-case stuck detection, old (every shard every poll) vs the budgeted poller.

Two parts, printed as tables:

1. The schedule (embedjob/operator/read_schedule.py) on a simulated clock, for N running
   shards up to 100 jobs x 10,000 shards: requests counted over 10 simulated minutes.
2. The real poller (threads, a file store with real heartbeat.json files) for a few hundred
   shards over ``--seconds`` of wall time under a small budget: requests counted by the
   poller's own metric (embedjob_storage_requests_total).

    python bench/storage_budget.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from embedjob import layout
from embedjob.operator import metrics
from embedjob.operator.config import OperatorSettings
from embedjob.operator.poller import Poller
from embedjob.operator.read_schedule import ReadSchedule
from embedjob.operator.storage_access import Stores, job_storage
from embedjob.progress import HeartbeatRecord, heartbeat_document
from embedjob.spec import parse_spec
from embedjob.store import open_store

GET_PRICE = 0.0004 / 1000  # S3 standard, USD per GET
POLL = 30.0
BUDGET = 6000.0
STUCK_AFTER = 1800.0


def simulate(jobs: int, shards: int, budget: float, minutes: float = 10) -> tuple[float, float]:
    """(requests a minute, per-shard interval) of the schedule on a simulated clock."""
    schedule = ReadSchedule(budget, POLL, now=0.0)
    for j in range(jobs):
        schedule.track(f"job{j}", dict.fromkeys(range(shards), 0))
    count, t, step = 0, 0.0, 0.25
    while t < minutes * 60:
        for read in schedule.take(t, 1_000_000):
            schedule.done(read, t)
            count += 1
        t += step
    return count / minutes, schedule.interval()


def part_one() -> None:
    print("1. schedule, simulated 10 min; budget storageRequestsPerMinute="
          f"{BUDGET:.0f}, progressPollSeconds={POLL:.0f}, stuckAfterSeconds={STUCK_AFTER:.0f}")
    head = ("running shards", "old GET/min", "old $/day", "new GET/min", "new $/day",
            "read every", "stuck seen within")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for jobs, shards in ((1, 100), (1, 1000), (10, 1000), (1, 10_000), (10, 10_000),
                         (100, 10_000)):
        n = jobs * shards
        old = n * 60 / POLL  # progress.json of every running shard every poll
        minutes = 10 if n <= 100_000 else 2
        new, interval = simulate(jobs, shards, BUDGET, minutes)
        worst = STUCK_AFTER + 2 * interval
        print(f"| {jobs} x {shards:,} | {old:,.0f} | {old * 1440 * GET_PRICE:,.2f} | "
              f"{new:,.0f} | {new * 1440 * GET_PRICE:,.2f} | {_dur(interval)} | {_dur(worst)} |")


def part_two(seconds: float) -> None:
    shards, budget = 400, 1200.0
    settings = OperatorSettings(progress_poll_seconds=1.0, storage_requests_per_minute=budget)
    with tempfile.TemporaryDirectory() as out:
        store = open_store(out)
        for s in range(shards):
            record = HeartbeatRecord(attempt=0, stage="embedding", beat=1, done=1, total=9)
            store.write_bytes(layout.shard_heartbeat(s), heartbeat_document(record))
        spec = parse_spec({"input": {"uri": "in.fa"}, "output": {"uri": out}})
        poller = Poller(settings, Stores(settings, lambda ns, name: {})).start()
        for j in range(4):  # four jobs on the same output: 4 x 100 shards
            poller.job(f"j{j}", f"j{j}", job_storage("ns", f"j{j}", spec, settings),
                       lambda: None)
            poller.track(f"j{j}", dict.fromkeys(range(j * 100, (j + 1) * 100), 0))
        before = _requests()
        time.sleep(seconds)
        made = _requests() - before
        interval = poller.schedule.interval()
    print(f"\n2. real poller (threads, file store): {shards} running shards in 4 jobs, budget "
          f"{budget:.0f}/min, {seconds:.0f} s")
    print("| shards | budget GET/min | measured GET/min | read every |")
    print("|---|---|---|---|")
    print(f"| {shards} | {budget:.0f} | {made * 60 / seconds:,.0f} | {_dur(interval)} |")


def _requests() -> float:
    total = 0.0
    for metric in metrics.STORAGE_REQUESTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
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
