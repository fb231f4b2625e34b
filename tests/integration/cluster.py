"""An emulated cluster for the operator's tests: kmock's API server, the real operator in a
subprocess, and a test kubelet that runs each pod's command as a local process.

The emulator keeps objects as plain JSON; this module adds what the operator's behaviour
depends on in a real cluster: uid/creationTimestamp/generation on create, generation bumps
on spec changes, garbage collection of owned pods, pod phases and container states, and
graceful pod deletion (a test-only finalizer keeps a deleted pod, with its
deletionTimestamp, until the kubelet has stopped its process: SIGTERM, grace, SIGKILL).

Pods get the AWS credentials by inheriting the test process' environment (the ``s3_bucket``
fixture puts moto's dummy credentials there); a pod env entry that references a Secret is
resolved from ``Kubelet(secrets=...)`` when given, else left to the inherited value.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock._internal.k8s import KubernetesError
from kubernetes import client, config

RESOURCES = {
    "v1/pods": {"namespaced": True, "kind": "Pod", "verbs": ["list", "watch", "create", "get",
                                                             "patch", "delete"]},
    # Discovery only: kopf waits to see these in the API even with scanning disabled.
    "v1/namespaces": {"namespaced": False, "kind": "Namespace", "verbs": ["list", "watch"]},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "namespaced": False, "kind": "CustomResourceDefinition", "verbs": ["list", "watch"]},
    "v1/events": {"namespaced": True, "kind": "Event", "verbs": ["list", "create"]},
    "embedjob.io/v1alpha1/embeddingjobs": {
        "namespaced": True, "kind": "EmbeddingJob", "singular": "embeddingjob",
        "verbs": ["list", "watch", "create", "get", "patch", "delete"],
        "subresources": ["status"], "shortnames": ["ej"],
    },
}


_VERSIONS = itertools.count(1)
REQUEST_LOG = 32
GRACEFUL = "test.embedjob.io/kubelet"
"""Finalizer the emulated API server puts on pods so that deletion is graceful."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_precise() -> str:
    """creationTimestamp with microseconds, so benchmarks can time creations (RFC 3339)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Emulator(kmock.KubernetesEmulator):
    """kmock plus the metadata a real API server maintains."""

    async def _handle(self, request):  # type: ignore[override]
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {}) if request.data else None
            if request.action == kmock.action.CREATE and meta is not None:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now_precise())
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = str(next(_VERSIONS))
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:6]
                if getattr(request.resource, "plural", None) == "pods":
                    meta.setdefault("finalizers", []).append(GRACEFUL)
            elif request.action == kmock.action.UPDATE and "spec" in request.data:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects:
                    gen = int(self.objects[key].get("metadata", {}).get("generation") or 1)
                    request.data.setdefault("metadata", {})["generation"] = gen + 1
            if request.action == kmock.action.UPDATE:
                request.data.setdefault("metadata", {})["resourceVersion"] = str(next(_VERSIONS))
        # kmock logs every request and re-filters the whole log on each one (quadratic over a
        # run); nothing here asserts on old requests, so keep only the recent, in-flight ones.
        del self._requests[:-REQUEST_LOG]
        try:
            return await super()._handle(request)
        except KubernetesError as err:  # kmock raises 404/409 here as a 500: answer properly
            return await self._render_error(err)


    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
        """kmock scans every object per request; a named request is one dict lookup."""
        if request.name is not None and request.resource is not None and (
                strict or request.namespace is not None):
            key = (request.resource, request.namespace, request.name)
            return [self._objects[key]] if key in self._objects else []
        return super()._KubernetesEmulator__get_objs(request, strict)  # type: ignore[misc]


class Cluster:
    """Start with :meth:`start`; everything runs on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.emulator = Emulator()
        self.server: Any = None
        self.kubeconfig = workdir / "kubeconfig"
        self.operator: subprocess.Popen[bytes] | None = None
        self.kubelet: Kubelet | None = None
        self.metrics_port = 0

    def start(self) -> Cluster:
        for key, info in RESOURCES.items():
            self.emulator.resources[key] = info
        self.thread.start()
        self.server = kmock.Server(self.emulator)
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(10)
        url = f"http://127.0.0.1:{self.server.port}"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": url}}],
            "users": [{"name": "emu", "user": {"token": "test"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu",
                                                      "namespace": "default"}}],
        }))
        api = config.new_client_from_config(str(self.kubeconfig))
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        return self

    def start_operator(self, settings: dict[str, Any] | None = None) -> None:
        cfg = self.workdir / "operator.yaml"
        cfg.write_text(yaml.safe_dump({"metricsPort": 0, "livenessPort": 0,
                                       "statusIntervalSeconds": 0.5,
                                       "progressPollSeconds": 1, **(settings or {})}))
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "EMBEDJOB_OPERATOR_CONFIG": str(cfg)}
        log = open(self.workdir / "operator.log", "ab")  # noqa: SIM115 - lives with the process
        self.operator = subprocess.Popen([sys.executable, "-m", "embedjob.operator"], env=env,
                                         stdout=log, stderr=log)
        atexit.register(self.operator.kill)  # never outlive the test run

    def stop_operator(self, sig: int = signal.SIGKILL) -> None:
        if self.operator is not None:
            self.operator.send_signal(sig)
            self.operator.wait(30)
            self.operator = None

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        self.stop_operator()
        asyncio.run_coroutine_threadsafe(self.server.__aexit__(None, None, None),
                                         self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    # --- helpers for tests -----------------------------------------------------------------

    def apply_job(self, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
        body = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        self.custom.create_namespaced_custom_object("embedjob.io", "v1alpha1", namespace,
                                                    "embeddingjobs", body)

    def patch_spec(self, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
        self.custom.patch_namespaced_custom_object("embedjob.io", "v1alpha1", namespace,
                                                   "embeddingjobs", name, {"spec": spec})

    def job(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("embedjob.io", "v1alpha1", namespace,
                                                        "embeddingjobs", name)

    def pods(self, namespace: str = "default") -> list[dict[str, Any]]:
        raw = self.core.list_namespaced_pod(namespace, _preload_content=False).data
        return list(json.loads(raw)["items"])

    def events(self, namespace: str = "default") -> list[dict[str, Any]]:
        return [
            {"reason": e.reason, "message": e.message, "type": e.type}
            for e in self.core.list_namespaced_event(namespace).items
        ]

    def wait_for(self, what: Callable[[], Any], timeout: float = 60, step: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = what()
            except Exception as err:
                last = err
            if last and not isinstance(last, Exception):
                return last
            time.sleep(step)
        raise AssertionError(f"timed out waiting; last: {last!r}")


class Kubelet:
    """Runs every created pod's command as a local process and reports its state.

    ``command`` maps a pod manifest to the argv to run (default: ``embedjob X`` becomes
    ``python -m embedjob.cli X``). Secrets referenced by env are resolved from ``secrets``.
    A deleted pod's process gets SIGTERM, then SIGKILL after the pod's grace period (capped
    by ``max_grace``); the pod is released (its finalizer removed) once the process is gone.
    """

    def __init__(self, cluster: Cluster, node: str = "node-1",
                 command: Callable[[dict[str, Any]], list[str]] | None = None,
                 secrets: dict[str, dict[str, str]] | None = None,
                 max_grace: float = 20.0,
                 instant: Callable[[dict[str, Any]], int] | None = None) -> None:
        self.cluster = cluster
        self.node = node
        self.command = command or (lambda pod: [sys.executable, "-m", "embedjob.cli",
                                                *pod["spec"]["containers"][0].get("args", [])])
        self.secrets = secrets or {}
        self.max_grace = max_grace
        self.instant = instant  # pod -> exit code, reported at once without a process
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path, dict[str, Any]]] = {}
        self.oom: set[str] = set()
        self.held: set[str] = set()  # pods left Pending as unschedulable until scheduled
        self.was_held: set[str] = set()
        self.kill_at: dict[str, float] = {}
        self.reported: set[str] = set()
        self.seen_at: dict[str, float] = {}  # first seen by this kubelet (time.monotonic)
        self.reported_at: dict[str, float] = {}  # terminal state written (time.time)
        self.logs = cluster.workdir / "pod-logs"
        self.logs.mkdir(exist_ok=True)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        cluster.kubelet = self

    def start(self) -> Kubelet:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                with self._lock:
                    self._tick()
            except Exception as err:
                print("kubelet:", err, file=sys.stderr)
            # A tick lists every pod: with thousands, leave the API server time to breathe.
            time.sleep(max(0.1, time.monotonic() - began))

    def _tick(self) -> None:
        c = self.cluster
        jobs = {j["metadata"]["uid"] for j in c.custom.list_cluster_custom_object(
            "embedjob.io", "v1alpha1", "embeddingjobs")["items"]}
        raw = c.core.list_pod_for_all_namespaces(_preload_content=False).data
        for pod in json.loads(raw)["items"]:  # raw JSON: the client's models are slow
            meta = pod["metadata"]
            name = meta["name"]
            self.seen_at.setdefault(name, time.monotonic())
            owners = [o["uid"] for o in meta.get("ownerReferences") or []]
            if owners and not set(owners) & jobs:  # garbage collection of orphans
                self._kill(name, signal.SIGKILL)
                self._force_delete(name, meta["namespace"])
                continue
            if meta.get("deletionTimestamp"):
                self._terminate(pod)
            elif name not in self.procs and (pod.get("status") or {}).get("phase") in (
                    None, "Pending"):
                if name in self.held:
                    self._hold(pod)
                elif self.instant is not None:
                    self._finish_at_once(pod, self.instant(pod))
                else:
                    self._run(pod)
            elif name in self.procs:
                self._report(pod)
        for name, deadline in list(self.kill_at.items()):
            if time.monotonic() > deadline:
                self._kill(name, signal.SIGKILL)
                del self.kill_at[name]

    def _terminate(self, pod: dict[str, Any]) -> None:
        """Graceful deletion: SIGTERM once, SIGKILL after the grace period, then release."""
        meta = pod["metadata"]
        name = meta["name"]
        entry = self.procs.get(name)
        if entry is not None and entry[0].poll() is None:
            if name not in self.kill_at:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                self.kill_at[name] = time.monotonic() + min(float(grace), self.max_grace)
                self._kill(name, signal.SIGTERM)
            return
        if entry is not None:
            self._report(pod)
        self.kill_at.pop(name, None)
        self._release(name, meta["namespace"])

    def _release(self, name: str, namespace: str) -> None:
        try:
            self._patch(name, namespace, {"metadata": {"finalizers": []}})
        except client.ApiException as err:
            if err.status != 404:
                raise

    def _force_delete(self, name: str, namespace: str) -> None:
        try:
            self.cluster.core.delete_namespaced_pod(name, namespace)
        except client.ApiException as err:
            if err.status != 404:
                raise
        self._release(name, namespace)

    def _run(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns = meta["namespace"]
        term = Path(tempfile.mkstemp(prefix=meta["name"] + "-", suffix=".term")[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDJOB_")}
        env.setdefault("OMP_NUM_THREADS", "1")  # the CI machine has 2 cores
        for item in pod["spec"]["containers"][0].get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                value = self.secrets.get(ref["name"], {}).get(ref["key"])
                if value is not None:
                    env[item["name"]] = value
        env["EMBEDJOB_TERMINATION_LOG"] = str(term)
        env.pop("HOME", None)
        env.pop("XDG_CACHE_HOME", None)
        with open(self.logs / f"{meta['name']}.log", "wb") as log:
            proc = subprocess.Popen(self.command(pod), env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.procs[meta["name"]] = (proc, term, pod)
        status: dict[str, Any] = {"phase": "Running", "startTime": _now()}
        if meta["name"] in self.was_held:
            status["conditions"] = [{"type": "PodScheduled", "status": "True",
                                     "lastTransitionTime": _now()}]
        self._patch(meta["name"], ns, {"spec": {"nodeName": self.node}, "status": status})

    def _hold(self, pod: dict[str, Any]) -> None:
        """Like the scheduler finding no node: Pending with PodScheduled=False/Unschedulable."""
        meta = pod["metadata"]
        if meta["name"] in self.was_held:
            return
        self.was_held.add(meta["name"])
        self._patch(meta["name"], meta["namespace"], {"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
             "lastTransitionTime": _now()}]}})

    def _finish_at_once(self, pod: dict[str, Any], exit_code: int) -> None:
        """Scheduled, run and terminated in one status write (benchmarks: no process)."""
        meta = pod["metadata"]
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                      "message": "", "finishedAt": _now()}
        self._patch(meta["name"], meta["namespace"], {
            "spec": {"nodeName": self.node},
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed", "startTime": _now(),
                       "containerStatuses": [{"name": "worker", "state": {
                           "terminated": terminated}, "ready": False, "restartCount": 0,
                           "image": "worker", "imageID": ""}]}})
        self.reported.add(meta["name"])
        self.reported_at[meta["name"]] = time.time()

    def _report(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        name = meta["name"]
        proc, term, _ = self.procs[name]
        code = proc.poll()
        if code is None or name in self.reported:
            return
        self.reported.add(name)
        exit_code = 128 - code if code < 0 else code
        reason = "OOMKilled" if name in self.oom else (
            "Completed" if exit_code == 0 else "Error")
        message = term.read_text() if term.exists() else ""
        if not message and exit_code:
            message = self.log(name)[-2000:]  # terminationMessagePolicy FallbackToLogsOnError
        terminated = {"exitCode": exit_code, "reason": reason, "message": message,
                      "finishedAt": _now()}
        self._patch(name, meta["namespace"], {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "worker", "state": {"terminated": terminated},
                                   "ready": False, "restartCount": 0, "image": "worker",
                                   "imageID": ""}],
        }})
        self.reported_at[name] = time.time()

    def _patch(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.cluster.core.patch_namespaced_pod(name, namespace, body)

    def _kill(self, name: str, sig: int) -> None:
        entry = self.procs.get(name)
        if entry and entry[0].poll() is None:
            entry[0].send_signal(sig)

    # --- faults ------------------------------------------------------------------------------

    def evict(self, name: str, namespace: str = "default", grace: float = 20) -> None:
        """Like the kubelet on a spot notice: DisruptionTarget, SIGTERM, grace, SIGKILL."""
        with self._lock:
            self._patch(name, namespace, {"status": {"conditions": [
                {"type": "DisruptionTarget", "status": "True",
                 "reason": "TerminationByKubelet"}]}})
            self._kill(name, signal.SIGTERM)
            self.kill_at[name] = time.monotonic() + grace

    def hold(self, name: str) -> None:
        """Leave pod ``name`` (created now or later) unschedulable until :meth:`schedule`."""
        with self._lock:
            self.held.add(name)

    def schedule(self, name: str) -> None:
        """A node fits now: the held pod starts on the next tick."""
        with self._lock:
            self.held.discard(name)

    def oom_kill(self, name: str) -> None:
        with self._lock:
            self.oom.add(name)
            self._kill(name, signal.SIGKILL)

    def lose_node(self, namespace: str = "default") -> None:
        """The node vanishes: its processes die and its pods are deleted."""
        with self._lock:
            for name, (proc, _, pod) in list(self.procs.items()):
                if proc.poll() is None:
                    proc.kill()
                    self._force_delete(name, pod["metadata"]["namespace"])


def write_summary(output: Path, shards: int, sequences: int) -> None:
    """An index summary as `embedjob index` writes it, for jobs whose pods run no worker."""
    from embedjob import layout
    from embedjob.worker.index import IndexSummary

    per = [sequences // shards + (1 if i < sequences % shards else 0) for i in range(shards)]
    summary = IndexSummary(shards=shards, sequences=sequences, residues=sequences * 100,
                           fingerprint="test", model="esm2_t6_8M_UR50D", alphabet="protein",
                           inputs=("in.fa",), shard_sequences=tuple(per),
                           shard_residues=tuple(n * 100 for n in per), max_length=100,
                           requested_shards=shards)
    path = output / layout.SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(summary.to_json())
