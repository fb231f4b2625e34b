"""The operator at scale on a real API server: one 10,000-shard job, and 100 jobs x 100 shards.

    python bench/operator_scale.py [--workload big|many|both] [--shards 10000] [--jobs 100]
        [--job-shards 100] [--fail 50] [--timeout 300] [--steady 45] [--s3-budget N]
        [--beating N]
        [--setting key=json ...] [--quick] [--repeat N]

Each workload gets a fresh control plane (etcd, kube-apiserver, kube-controller-manager from
``$KUBEBUILDER_ASSETS``, tests/envtest.py), moto's S3 server in its own process, the real
operator as the chart's ServiceAccount (tests/operatorkit.py) and an instant kubelet
(bench/scale_kubelet.py): index pods succeed at once (index/summary.json is written to S3
first), workers are bound and reported Running and stay so. Then, per workload:

1. apply the jobs; time until every shard's first pod exists (as the kubelet's watch sees it);
2. end ``--fail`` running workers as preempted (Failed, exit 143), spread over 10 s, and time
   failure -> the replacement pod (seen by the watch);
3. ``--steady`` seconds with nothing happening (progress polling, status patches).

The kubelet writes no heartbeats: the operator's listings find none (no GETs). With
``--beating N`` the bench rewrites the first N running workers' heartbeats every 10 s, as
real workers do, and the operator GETs those that changed.

Measured over the whole run: the longest /healthz answer (polled every 50 ms: kopf serves it
on the operator's event loop) and the operator's own loop-lag metric when it has one;
reconcile pass times (embedjob_reconcile_duration_seconds); the operator's CPU seconds and
peak RSS (/proc); its API requests by verb (the API server's audit log, filtered to the
operator's ServiceAccount: exact, the bench's own requests are not in it); the largest job
status (``json.dumps``); S3 requests per minute (moto's request log, and the operator's
embedjob_storage_requests_total when it exports one). Exit 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]

import boto3  # noqa: E402
from envtest import ControlPlane, assets_folder  # noqa: E402
from kubernetes import client, config  # noqa: E402
from operatorkit import CREDENTIALS_SECRET, Operator, create_job, prepare_namespace  # noqa: E402
from scale_kubelet import InstantKubelet  # noqa: E402
from scale_probes import (  # noqa: E402
    HealthProbe,
    MotoServer,
    audit_args,
    audit_counts,
    gauge_max,
    loop_lag,
    proc_usage,
    reconcile_times,
    scrape,
    storage_requests,
    tree_usage,
)
from scale_table import Result, rows, summary, table  # noqa: E402

from embedjob import layout  # noqa: E402
from embedjob.operator.config import OperatorSettings  # noqa: E402
from embedjob.progress import HeartbeatRecord, heartbeat_document  # noqa: E402
from embedjob.spec import API_GROUP, API_VERSION, PLURAL  # noqa: E402
from embedjob.worker.index import IndexSummary  # noqa: E402

BUCKET = "bench"
BASE_SETTINGS = {"statusIntervalSeconds": 5.0, "progressPollSeconds": 30.0}
"""The operator's defaults for these two (operatorkit's test values are faster)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_summaries(s3: Any, names: list[str], shards: int) -> None:
    """index/summary.json per job, as `embedjob index` writes it (10 sequences a shard):
    no index pod has to run."""
    per = [10] * shards
    summary = IndexSummary(shards=shards, sequences=10 * shards, residues=1000 * shards,
                           fingerprint="bench", model="esm2_t6_8M_UR50D", alphabet="protein",
                           inputs=("in.fa",), shard_sequences=tuple(per),
                           shard_residues=tuple(n * 100 for n in per), max_length=100,
                           requested_shards=shards)
    for name in names:
        s3.put_object(Bucket=BUCKET, Key=f"{name}/{layout.SUMMARY}", Body=summary.to_json())


def job_spec(name: str, shards: int, endpoint: str) -> dict[str, Any]:
    return {"input": {"uri": f"s3://{BUCKET}/in.fa"}, "output": {"uri": f"s3://{BUCKET}/{name}/"},
            "shards": shards, "parallelism": shards,
            "storage": {"endpointUrl": endpoint, "region": "us-east-1",
                        "credentialsSecret": CREDENTIALS_SECRET}}


class Beater:
    """Workers' heartbeats, as real workers write them: every ``interval`` seconds, the
    first ``count`` running workers each PUT their ``heartbeats/NNNNN.json`` with a moved
    counter (in the bench's process: its CPU and moto's are the cost of the bench)."""

    def __init__(self, s3: Any, kubelet: InstantKubelet, count: int,
                 interval: float = 10.0) -> None:
        self.s3, self.kubelet, self.count, self.interval = s3, kubelet, count, interval
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beater", daemon=True)

    def start(self) -> Beater:
        if self.count:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        beat = 0
        while not self._stop.wait(self.interval):
            beat += 1
            for name in self.kubelet.running_workers()[: self.count]:
                job, shard, attempt = name.rsplit("-", 2)
                record = HeartbeatRecord(attempt=int(attempt), stage="embedding", beat=beat,
                                         done=beat, total=10, interval=self.interval)
                self.s3.put_object(Bucket=BUCKET, Key=f"{job}/{layout.shard_heartbeat(int(shard))}",
                                   Body=heartbeat_document(record))
                self.written += 1


class Bench:
    """One workload on its own control plane, S3 server, kubelet and operator."""

    def __init__(self, args: argparse.Namespace, name: str, jobs: int, shards: int) -> None:
        self.args, self.result = args, Result(name, jobs, shards)
        self.folder = Path(tempfile.mkdtemp(prefix=f"embedjob-scale-{name}-"))
        self.names = [f"{name}{i}" if jobs > 1 else name for i in range(jobs)]
        self.namespace = f"bench-{uuid.uuid4().hex[:6]}"
        self.ports = {"metrics": free_port(), "liveness": free_port()}

    def run(self) -> Result:
        started = time.monotonic()
        self.own_cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        assets = assets_folder()
        if assets is None:
            sys.exit("KUBEBUILDER_ASSETS is unset: the bench needs etcd and kube-apiserver "
                     "(`setup-envtest use`, or ../shared/envtest/install.sh)")
        self.plane = ControlPlane(assets, self.folder / "plane")
        self.plane.folder.mkdir()
        self.plane.apiserver_args = audit_args(self.plane.folder)
        self.moto = MotoServer(self.folder, free_port())
        try:
            self.plane.start()
            self.moto.start()
            self.setup()
            self.measure()
        finally:
            self.teardown()
        self.result.wall = time.monotonic() - started
        return self.result

    def setup(self) -> None:
        self.plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "embeddingjob.yaml"))
        self.plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                           f"crd/{PLURAL}.{API_GROUP}")
        self.api = config.new_client_from_config(str(self.plane.kubeconfig))
        client.CoreV1Api(self.api).create_namespace({"metadata": {"name": self.namespace}})
        prepare_namespace(self.api, self.namespace)
        s3 = boto3.client("s3", endpoint_url=self.moto.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)
        write_summaries(s3, self.names, self.result.shards)
        self.kubelet = InstantKubelet(str(self.plane.kubeconfig), self.namespace,
                                      writers=self.args.kubelet_writers).start()
        self.beater = Beater(s3, self.kubelet, self.args.beating).start()
        settings = {**BASE_SETTINGS, **self.args.setting, "metricsPort": self.ports["metrics"],
                    "livenessPort": self.ports["liveness"]}
        self.operator = Operator(self.plane, self.api, self.namespace, self.folder,
                                 settings).start()
        self.probe = HealthProbe(f"http://127.0.0.1:{self.ports['liveness']}/healthz")
        deadline = time.monotonic() + 120
        while not self.healthy():
            if time.monotonic() > deadline or self.operator.proc.poll() is not None:
                raise RuntimeError("operator did not come up:\n" + self.operator.log_tail())
            time.sleep(0.5)
        self.probe.start()
        time.sleep(2)  # kopf's watches are up

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.probe.url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def measure(self) -> None:
        # Not operatorkit.Jobs: its record of every pod (a watch with the client's models)
        # would cost this process ~80 CPU-s at 10^4 pods, on the cores the operator needs.
        self.custom = client.CustomObjectsApi(self.api)
        t0 = time.monotonic()
        for name in self.names:
            create_job(self.custom, self.namespace, name,
                       job_spec(name, self.result.shards, self.moto.endpoint))
        first = [f"{n}-{s}-0" for n in self.names for s in range(self.result.shards)]
        self.wait_until(lambda: all(p in self.kubelet.seen for p in first), self.args.timeout)
        seen = [self.kubelet.seen[p] for p in first if p in self.kubelet.seen]
        self.result.pods_seen = len(seen)
        self.result.first_pod = min(seen, default=math.nan) - t0
        if len(seen) == len(first):
            self.result.all_pods = max(seen) - t0
        running = self.kubelet.running_at  # the kubelet's backlog: not the operator's time
        self.wait_until(lambda: all(p in running for p in first), self.args.settle)
        if all(p in running for p in first):
            self.result.all_running = max(running[p] for p in first) - t0
        self.fail_some()
        self.wait_until(lambda: False, self.args.steady)
        self.finish(t0)

    def wait_until(self, done: Any, timeout: float) -> None:
        """Poll the jobs' status (size) every 2 s until ``done()`` or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll_status()
            if done() or time.monotonic() > deadline:
                return
            if self.operator.proc.poll() is not None:
                raise RuntimeError("operator exited:\n" + self.operator.log_tail())
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def poll_status(self) -> None:
        raw = self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace,
                                                        PLURAL, _preload_content=False).data
        for job in json.loads(raw)["items"]:
            size = len(json.dumps(job.get("status") or {}, separators=(",", ":")))
            self.result.status_max = max(self.result.status_max, size)

    def fail_some(self) -> None:
        """Preempt ``--fail`` running workers, spread over the jobs and over 10 s."""
        running = self.kubelet.running_workers()
        count = min(self.args.fail, len(running))
        if not count:
            return
        chosen = [running[round(i * len(running) / count)] for i in range(count)]
        for name in chosen:
            self.kubelet.fail([name])
            time.sleep(10.0 / count)
        self.result.failed = count

        def replacement(name: str) -> str:
            job, shard, attempt = name.rsplit("-", 2)
            return f"{job}-{shard}-{int(attempt) + 1}"

        wanted = {name: replacement(name) for name in chosen}
        self.wait_until(lambda: all(r in self.kubelet.seen for r in wanted.values()),
                        self.args.replace_timeout)
        self.result.latencies = [self.kubelet.seen[r] - self.kubelet.failed_at[f]
                                 for f, r in wanted.items() if r in self.kubelet.seen]

    def finish(self, t0: float) -> None:
        r = self.result
        elapsed_min = (time.monotonic() - t0) / 60
        samples = scrape(self.ports["metrics"])
        r.loop_metric = loop_lag(samples)
        r.loop_cpu_wait = gauge_max(samples, "embedjob_event_loop_lag_max_cpu_wait_seconds")
        r.loop_own = gauge_max(samples, "embedjob_event_loop_block_max_seconds")
        r.reconcile = reconcile_times(samples)
        total = storage_requests(samples)
        r.s3_metric_per_min = None if total is None else total / elapsed_min
        assert self.operator.proc is not None
        r.cpu, r.rss = tree_usage(self.operator.proc.pid)
        r.healthz_worst = self.probe.worst
        self.poll_status()
        s3 = self.moto.requests()
        progress = sum(v for k, v in s3.items() if k == "GET progress")  # not the PUTs
        r.s3_per_min = progress / elapsed_min
        r.s3_detail = ", ".join(f"{k} {v}" for k, v in sorted(s3.items()))
        r.kubelet_requests = dict(self.kubelet.requests)
        r.plane_cpu = {name: proc_usage(proc.pid)[0]
                       for name, proc in self.plane.processes.items()}
        if self.moto.proc is not None:
            r.plane_cpu["moto"] = proc_usage(self.moto.proc.pid)[0]
        r.plane_cpu["bench (kubelet, probes)"] = (
            sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - self.own_cpu)
        r.errors = self.kubelet.errors[:5]

    def teardown(self) -> None:
        if hasattr(self, "beater"):
            self.beater.stop()
        if hasattr(self, "probe"):
            self.probe.stop()
        if hasattr(self, "operator"):
            self.operator.stop()
        if hasattr(self, "kubelet"):
            self.kubelet.stop()
        user = f"system:serviceaccount:{self.namespace}:"  # the chart's account is the only one
        self.plane.stop()  # flushes the audit log's last batch
        self.result.verbs = dict(audit_counts(self.plane.folder / "audit.log", user))
        self.moto.stop()
        if not self.args.keep:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            print(f"kept {self.folder}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("big", "many", "both"), default="both")
    parser.add_argument("--shards", type=int, default=10000, help="shards of the big job")
    parser.add_argument("--jobs", type=int, default=100, help="jobs of the many workload")
    parser.add_argument("--job-shards", type=int, default=100, help="shards per job (many)")
    parser.add_argument("--fail", type=int, default=50, help="running workers preempted")
    parser.add_argument("--timeout", type=float, default=240,
                        help="seconds to wait for every first pod")
    parser.add_argument("--replace-timeout", type=float, default=120)
    parser.add_argument("--settle", type=float, default=60,
                        help="seconds to wait, after every pod exists, for the kubelet to "
                             "report them all Running")
    parser.add_argument("--kubelet-writers", type=int, default=8,
                        help="the bench kubelet's concurrent writes")
    parser.add_argument("--steady", type=float, default=45,
                        help="quiet seconds at the end (polling, status patches)")
    parser.add_argument("--s3-budget", type=float, default=None,
                        help="S3 progress/heartbeat requests per minute allowed (default: the "
                             "operator's storageRequestsPerMinute)")
    parser.add_argument("--beating", type=int, default=0,
                        help="running workers whose heartbeat the bench rewrites every 10 s "
                             "(0: none — only the operator's listings, no GETs)")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=JSON",
                        help="extra operator setting (camelCase key), e.g. statusIntervalSeconds=5")
    parser.add_argument("--quick", action="store_true",
                        help="sanity run: 1,000 shards and 10 x 100, 10 preemptions, 15 s steady")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per workload; with more than one, a target counts as met "
                             "when most runs met it (the summary table)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.setting = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.setting)}
    if args.s3_budget is None:
        args.s3_budget = float(args.setting.get(
            "storageRequestsPerMinute", OperatorSettings().storage_requests_per_minute))
    if args.quick:
        args.shards, args.jobs, args.fail, args.steady = 1000, 10, 10, 15
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workloads = {"big": (1, args.shards), "many": (args.jobs, args.job_shards)}
    chosen = list(workloads) if args.workload == "both" else [args.workload]
    ok = True
    for name in chosen:
        jobs, shards = workloads[name]
        runs = []
        for _ in range(args.repeat):
            result = Bench(args, name, jobs, shards).run()
            text, passed = table(result, args)
            print(text + "\n", flush=True)
            runs.append(rows(result, args))
        if args.repeat > 1:
            text, passed = summary(name, runs)
            print(text + "\n", flush=True)
        ok = ok and passed
    if not ok:
        print("operator_scale: at least one target missed (rows marked FAIL)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
