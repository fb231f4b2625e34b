"""The table of bench/operator_scale.py: one Markdown table per workload, targets, pass/fail."""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field

MiB = 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Result:
    """What one workload measured (times in seconds from the first job's apply)."""

    name: str
    jobs: int
    shards: int
    first_pod: float = math.nan
    all_pods: float = math.nan
    all_running: float = math.nan
    plane_cpu: dict[str, float] = field(default_factory=dict)
    pods_seen: int = 0
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    healthz_worst: float = math.nan
    loop_metric: str | None = None
    loop_cpu_wait: float | None = None
    """Of the longest lag, seconds the loop's thread waited for a CPU (operator's gauge)."""
    loop_own: float | None = None
    """The longest lag less the CPU wait in it: the operator's own block (its gauge)."""
    reconcile: str = "n/a"
    cpu: float = math.nan
    rss: int = 0
    verbs: dict[str, int] = field(default_factory=dict)
    status_max: int = 0
    s3_per_min: float = math.nan
    s3_metric_per_min: float | None = None
    s3_detail: str = ""
    kubelet_requests: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0



def fmt_s(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f} s"


def rows(r: Result, args: argparse.Namespace) -> list[tuple[str, str, str, bool | None]]:
    """(metric, measured, target, passed: None when the row has no target)."""
    lat = r.latencies
    p50 = statistics.median(lat) if lat else math.nan
    p95 = percentile(lat, 0.95) if lat else math.nan
    pods = r.jobs * r.shards
    exist = fmt_s(r.all_pods) if r.pods_seen == pods else f"{r.pods_seen}/{pods} after timeout"
    big = r.name == "big"
    out: list[tuple[str, str, str, bool | None]] = [
        ("first worker pod exists (index pod done, summary read)", fmt_s(r.first_pod), "",
         None),
        ("time until every shard's pod exists", exist, "<= 120 s" if big else "",
         (r.all_pods <= 120) if big else None),
        ("every first pod Running (bench kubelet)", fmt_s(r.all_running), "", None),
        ("failure -> replacement p50", fmt_s(p50, 2) + f" ({len(lat)}/{r.failed} replaced)",
         "", None),
        ("failure -> replacement p95", fmt_s(p95, 2), "<= 2 s", p95 <= 2.0),
    ]
    healthz = f"{r.healthz_worst * 1000:.0f} ms"
    metric = r.loop_metric or "n/a (no embedjob_event_loop_lag_seconds)"
    if r.loop_metric is None:  # only the outside view: it gates
        out.append(("longest /healthz answer (event-loop block, outside)", healthz, "<= 100 ms",
                    r.healthz_worst <= 0.1))
        out.append(("event-loop lag (operator's metric)", metric, "", None))
    else:
        lag = _metric_seconds(r.loop_metric)
        out.append(("longest /healthz answer (event-loop block, outside)", healthz, "", None))
        out.append(("event-loop lag (operator's metric)", metric, "<= 100 ms",
                    lag is not None and lag <= 0.1))
        if r.loop_cpu_wait is not None:
            out.append(("of that lag, the loop waiting for a CPU (run queue)",
                        f"{r.loop_cpu_wait * 1000:.0f} ms", "", None))
        if r.loop_own is not None:
            out.append(("longest lag less its CPU wait (the operator's own block)",
                        f"{r.loop_own * 1000:.0f} ms", "", None))
    out += [
        ("reconcile pass time", r.reconcile, "", None),
        ("operator CPU (whole run, with its read process)", fmt_s(r.cpu), "", None),
        ("operator peak RSS (with its read process)", f"{r.rss / MiB:.0f} MiB", "<= 400 MiB",
         r.rss <= 400 * MiB),
        ("largest job status", f"{r.status_max / 1024:.1f} KiB", "<= 256 KiB",
         r.status_max <= 256 * 1024),
    ]
    s3 = f"{r.s3_per_min:.0f} /min"
    if r.s3_metric_per_min is not None:
        s3 += f" (operator's counter: {r.s3_metric_per_min:.0f} /min)"
    if args.s3_budget is None:
        out.append(("S3 progress requests (moto's log)", s3, "budget: none set", False))
    else:
        out.append(("S3 progress requests (moto's log)", s3, f"<= {args.s3_budget:g} /min",
                    r.s3_per_min <= args.s3_budget))
    return out


def _metric_seconds(text: str) -> float | None:
    try:
        return float(text.split("ms")[0].strip("<= ")) / 1000
    except ValueError:
        return None


def summary(name: str, runs: list[list[tuple[str, str, str, bool | None]]]) -> tuple[str, bool]:
    """The targets of one workload over repeated runs (``rows`` of each, matched by metric):
    every run's measurement side by side, and a target counts as met when most runs met it
    (for an odd count, when the median run did). One run on a shared machine decides
    nothing."""
    count = len(runs)
    lines = [f"### {name}: targets over {count} runs", "",
             "| metric | " + " | ".join(f"run {i + 1}" for i in range(count))
             + " | target | met in | |",
             "|---|" + "---|" * count + "---|---|---|"]
    ok = True
    by_metric = [{metric: (measured, passed) for metric, measured, _, passed in run}
                 for run in runs]
    for metric, _, target, passed in runs[0]:
        if passed is None:
            continue
        seen = [run.get(metric, ("n/a", None)) for run in by_metric]
        verdicts = [verdict is True for _, verdict in seen]
        met = 2 * sum(verdicts) > count
        ok = ok and met
        lines.append(f"| {metric} | " + " | ".join(measured for measured, _ in seen)
                     + f" | {target} | {sum(verdicts)} of {count} | "
                     + ("pass" if met else "**FAIL**") + " |")
    return "\n".join(lines), ok


def table(r: Result, args: argparse.Namespace) -> tuple[str, bool]:
    """The workload's Markdown table, and whether every target was met."""
    head = (f"### {r.name}: {r.jobs} job(s) x {r.shards} shards, {r.failed} preemptions, "
            f"{args.steady:g} s steady ({r.wall:.0f} s in all)")
    lines = [head, "", "| metric | measured | target | |", "|---|---|---|---|"]
    ok = True
    for metric, measured, target, passed in rows(r, args):
        mark = "" if passed is None else ("pass" if passed else "**FAIL**")
        ok = ok and passed is not False
        lines.append(f"| {metric} | {measured} | {target} | {mark} |")
    verbs = ", ".join(f"{k} {v}" for k, v in sorted(r.verbs.items(), key=lambda kv: -kv[1]))
    lines += ["", f"Operator's API requests (audit log, its ServiceAccount only): "
              f"{sum(r.verbs.values())} — {verbs or 'none'}",
              "Bench kubelet's own requests (not above): "
              + ", ".join(f"{k} {v}" for k, v in sorted(r.kubelet_requests.items())),
              f"S3 requests (moto's log, whole run): {r.s3_detail or 'none'}",
              "CPU seconds of the rest (whole workload): "
              + ", ".join(f"{k} {v:.0f}" for k, v in r.plane_cpu.items())]
    if r.errors:
        lines.append("Kubelet errors: " + "; ".join(r.errors))
    return "\n".join(lines), ok


