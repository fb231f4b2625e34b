"""What bench/operator_scale.py reads from outside the operator: /healthz latency, /proc,
the operator's Prometheus metrics, the API server's audit log, and moto's request log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from prometheus_client.parser import text_string_to_metric_families

LOOP_LAG_METRIC = "embedjob_event_loop_lag_seconds"
STORAGE_METRIC = "embedjob_storage_requests_total"
RECONCILE_METRIC = "embedjob_reconcile_duration_seconds"


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


def tree_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process and its live children, summed: the
    operator's storage reads run in a child process, and the pod's limit covers both."""
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            children |= {int(c) for c in (task / "children").read_text().split()}
    usages = [proc_usage(pid)] + [proc_usage(c) for c in sorted(children)
                                  if Path(f"/proc/{c}").exists()]
    return sum(u[0] for u in usages), sum(u[1] for u in usages)


@dataclass
class HealthProbe:
    """GET the operator's /healthz every ``every`` seconds; the slowest answer bounds the
    longest event-loop block from outside (kopf serves it on the operator's loop)."""

    url: str
    every: float = 0.05
    worst: float = 0.0
    answered: int = 0
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> HealthProbe:
        threading.Thread(target=self._run, daemon=True, name="healthz-probe").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def reset(self) -> None:
        self.worst, self.answered, self.failed = 0.0, 0, 0

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=30) as resp:
                    resp.read()
                self.answered += 1
            except OSError:
                self.failed += 1  # not up yet, or timed out: the time still counts below
            took = time.monotonic() - started
            if self.answered:
                self.worst = max(self.worst, took)
            self._stop.wait(self.every)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of the operator's /metrics: name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def histogram_max_bound(samples: dict[str, list[tuple[dict[str, str], float]]],
                        name: str) -> float | None:
    """The smallest bucket bound that holds every observation (an upper bound on the max)."""
    buckets = sorted((float(labels["le"]), value) for labels, value in
                     samples.get(f"{name}_bucket", []))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= total)


def loop_lag(samples: dict[str, list[tuple[dict[str, str], float]]]) -> str | None:
    """The operator's own loop-lag metric, if it has one: a gauge's max, or a histogram's
    bound on the max (the name is the loop helper's; absent before that work lands)."""
    for name in ("embedjob_event_loop_lag_max_seconds", f"{LOOP_LAG_METRIC}_max"):  # exact
        if name in samples:
            return f"{max(v for _, v in samples[name]) * 1000:.0f} ms"
    if f"{LOOP_LAG_METRIC}_bucket" in samples:
        bound = histogram_max_bound(samples, LOOP_LAG_METRIC)
        return None if bound is None else f"<= {bound * 1000:.0f} ms (histogram bound)"
    return None


def gauge_max(samples: dict[str, list[tuple[dict[str, str], float]]], name: str
              ) -> float | None:
    """The largest value of one of the operator's gauges (None when it has no such one)."""
    values = [v for _, v in samples.get(name, [])]
    return max(values) if values else None


def reconcile_times(samples: dict[str, list[tuple[dict[str, str], float]]]) -> str:
    count = sum(v for _, v in samples.get(f"{RECONCILE_METRIC}_count", []))
    total = sum(v for _, v in samples.get(f"{RECONCILE_METRIC}_sum", []))
    if not count:
        return "n/a"
    bound = histogram_max_bound(samples, RECONCILE_METRIC)
    worst = f"<= {bound:g} s" if bound is not None and bound != float("inf") else "> 10 s"
    return f"mean {total / count:.3f} s, max {worst} ({count:.0f} passes)"


def storage_requests(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float | None:
    """Total of the operator's own storage-request counter, if it exports one."""
    if STORAGE_METRIC not in samples:
        return None
    return sum(v for _, v in samples[STORAGE_METRIC])


# --- the API server's audit log: the operator's requests, exactly ---------------------------

AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
"""
"""Only ServiceAccounts are recorded: the operator runs as the chart's; the bench's kubelet,
its pollers and the controller-manager use the admin certificate."""


def audit_args(folder: Path) -> list[str]:
    policy = folder / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    return ["--audit-policy-file", str(policy), "--audit-log-path", str(folder / "audit.log"),
            "--audit-log-mode", "batch", "--audit-log-maxsize", "0"]


def audit_counts(log: Path, user: str) -> Counter[str]:
    """Requests by ``verb resource[/subresource]`` made by users whose name starts with
    ``user`` (one per audit id)."""
    counted: dict[str, str] = {}
    if not log.exists():
        return Counter()
    with log.open() as lines:
        for line in lines:
            try:
                entry: dict[str, Any] = json.loads(line)
            except ValueError:
                continue  # a line cut by the batch writer at the very end
            if not (entry.get("user") or {}).get("username", "").startswith(user):
                continue
            ref = entry.get("objectRef") or {}
            what = ref.get("resource", "(discovery)")  # no objectRef: /api, /apis/...
            if ref.get("subresource"):
                what += "/" + ref["subresource"]
            counted[entry["auditID"]] = f"{entry['verb']} {what}"
    return Counter(counted.values())


# --- S3: moto's server in its own process, counted from its request log ------------------


@dataclass
class MotoServer:
    """``python -m moto.server`` on loopback; werkzeug logs one line per request, which is
    how S3 requests are counted (no proxy in the path, no load in the bench's process)."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "moto.log"

    def start(self) -> MotoServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"moto server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def requests(self) -> Counter[str]:
        """Requests so far by ``METHOD kind`` (kind: progress — a listing of heartbeats/, a
        heartbeat or a shard's progress.json, what the operator polls — / summary / other)."""
        seen: Counter[str] = Counter()
        for match in REQUEST_LINE.finditer(self.log.read_text(errors="replace")):
            path = unquote(match["path"])
            kind = ("progress" if "heartbeats/" in path or path.endswith("/progress.json")
                    else "summary" if path.endswith("/summary.json") else "other")
            seen[f"{match['method']} {kind}"] += 1
        return seen


REQUEST_LINE = re.compile(r'"(?P<method>GET|PUT|HEAD|POST|DELETE) (?P<path>\S+) HTTP/1\.\d"')
