"""The operator at scale on the emulated cluster: one job of N shards whose pods finish at once.

    python bench/operator_scale.py [--shards 1000] [--fail-every 10] [--timeout 600]

kmock's API server, the real operator (a subprocess, default settings) and the test kubelet
of tests/integration/cluster.py in its instant mode: each pod is reported terminated as soon
as the kubelet sees it, exit 0, or 143 for attempt 0 of every ``--fail-every``-th shard (a
preemption, which the policy replaces at once). No process, no model, no S3: the index
summary is written to a local output directory first.

Measured:
- time from ``apply`` until every shard's first pod exists (its creationTimestamp, which
  the emulator stamps with microseconds);
- failure -> replacement: from the kubelet's write of a pod's Failed status to the
  creationTimestamp of the next attempt's pod;
- the job's status size in bytes (the largest seen while polling, and at the end);
- the operator process' CPU seconds and peak RSS (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from cluster import Cluster, Kubelet, write_summary  # noqa: E402

TARGETS = {"all pods exist": 30.0, "replacement p95": 2.0, "status size": 256 * 1024}


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


def pod_exit_code(fail: set[int]):
    """Exit 143 (preempted: replaced at once) for attempt 0 of the shards in ``fail``."""
    def exit_code(pod: dict) -> int:
        labels = pod["metadata"]["labels"]
        shard, attempt = labels.get("embedjob.io/shard"), labels.get("embedjob.io/attempt")
        return 143 if shard.isdigit() and int(shard) in fail and attempt == "0" else 0
    return exit_code


def created(pods: list[dict]) -> dict[str, float]:
    out = {}
    for pod in pods:
        stamp = pod["metadata"]["creationTimestamp"]
        out[pod["metadata"]["name"]] = datetime.fromisoformat(
            stamp.replace("Z", "+00:00")).timestamp()
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(shards: int, fail_every: int, timeout: float) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="embedjob-scale-"))
    out = work / "out"
    write_summary(out, shards=shards, sequences=shards * 10)
    fail = set(range(0, shards, fail_every)) if fail_every else set()
    cluster = Cluster(work).start()
    kubelet = Kubelet(cluster, instant=pod_exit_code(fail)).start()
    seen: dict[str, float] = {}
    cluster.start_operator({"statusIntervalSeconds": 5.0, "progressPollSeconds": 30.0})
    assert cluster.operator is not None
    pid = cluster.operator.pid
    time.sleep(3)  # let kopf start before the clock runs
    spec = {"input": {"uri": "/dev/null"}, "output": {"uri": f"{out}/"}, "shards": shards,
            "parallelism": shards}
    started = time.monotonic()
    wall = time.time()
    cluster.apply_job("scale", spec)
    first = {f"scale-{s}-0" for s in range(shards)}
    all_pods_at = None
    max_status = 0
    phase = ""
    deadline = started + timeout
    while time.monotonic() < deadline:
        seen.update(created(cluster.pods()) if all_pods_at is None else {})
        if all_pods_at is None and first <= seen.keys():
            all_pods_at = max(seen[n] for n in first) - wall
        status = cluster.job("scale").get("status") or {}
        max_status = max(max_status, len(json.dumps(status, separators=(",", ":"))))
        phase = status.get("phase", "")
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(2.0)  # timings come from API timestamps: polling rarely loses nothing
    total = time.monotonic() - started
    cpu, rss = proc_usage(pid)
    final = len(json.dumps(cluster.job("scale").get("status") or {}, separators=(",", ":")))
    births = created(cluster.pods())
    latencies = [births[f"scale-{s}-1"] - kubelet.reported_at[f"scale-{s}-0"]
                 for s in fail
                 if f"scale-{s}-1" in births and f"scale-{s}-0" in kubelet.reported_at]
    cluster.stop()
    return {
        "shards": shards, "phase": phase, "failures": len(fail), "replaced": len(latencies),
        "all pods exist": all_pods_at if all_pods_at is not None else float("nan"),
        "job done": total,
        "replacement p50": statistics.median(latencies) if latencies else float("nan"),
        "replacement p95": percentile(latencies, 0.95) if latencies else float("nan"),
        "status size": max_status, "final status size": final,
        "operator cpu": cpu, "operator peak rss": rss,
    }


def table(r: dict) -> str:
    rows = [
        ("time until every shard pod exists", f"{r['all pods exist']:.1f} s", "<= 30 s"),
        ("failure -> replacement p50", f"{r['replacement p50']:.2f} s", ""),
        ("failure -> replacement p95", f"{r['replacement p95']:.2f} s", "<= 2 s"),
        ("status size (max while running)", f"{r['status size'] / 1024:.1f} KiB", "<= 256 KiB"),
        ("status size (final)", f"{r['final status size'] / 1024:.1f} KiB", ""),
        ("operator CPU (whole run)", f"{r['operator cpu']:.1f} s", ""),
        ("operator peak RSS", f"{r['operator peak rss'] / 2**20:.0f} MiB", ""),
        ("apply -> job finished", f"{r['job done']:.1f} s ({r['phase']})", ""),
    ]
    head = (f"{r['shards']} shards, {r['failures']} injected preemptions "
            f"({r['replaced']} replacements seen)")
    lines = [head, "", "| metric | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--fail-every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    print(table(run(args.shards, args.fail_every, args.timeout)))


if __name__ == "__main__":
    main()
