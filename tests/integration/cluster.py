"""An emulated cluster for the operator's tests: kmock's API server, the real operator in a
subprocess, and a test kubelet that runs each pod's command as a local process.

The emulator keeps objects as plain JSON; this module adds what the operator's behaviour
depends on in a real cluster: uid/creationTimestamp/generation on create, generation bumps
on spec changes, garbage collection of owned pods, pod phases and container states.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import itertools
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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Emulator(kmock.KubernetesEmulator):
    """kmock plus the metadata a real API server maintains."""

    async def _handle(self, request):  # type: ignore[override]
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {}) if request.data else None
            if request.action == kmock.action.CREATE and meta is not None:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = str(next(_VERSIONS))
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:6]
            elif request.action == kmock.action.UPDATE and "spec" in request.data:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects:
                    gen = int(self.objects[key].get("metadata", {}).get("generation") or 1)
                    request.data.setdefault("metadata", {})["generation"] = gen + 1
            if request.action == kmock.action.UPDATE:
                request.data.setdefault("metadata", {})["resourceVersion"] = str(next(_VERSIONS))
        return await super()._handle(request)


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
        items = self.core.api_client.sanitize_for_serialization(
            self.core.list_namespaced_pod(namespace).items)
        return list(items)

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
    """

    def __init__(self, cluster: Cluster, node: str = "node-1",
                 command: Callable[[dict[str, Any]], list[str]] | None = None,
                 secrets: dict[str, dict[str, str]] | None = None) -> None:
        self.cluster = cluster
        self.node = node
        self.command = command or (lambda pod: [sys.executable, "-m", "embedjob.cli",
                                                *pod["spec"]["containers"][0].get("args", [])])
        self.secrets = secrets or {}
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path, dict[str, Any]]] = {}
        self.oom: set[str] = set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        cluster.kubelet = self

    def start(self) -> Kubelet:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as err:
                print("kubelet:", err, file=sys.stderr)
            time.sleep(0.1)

    def _tick(self) -> None:
        c = self.cluster
        jobs = {j["metadata"]["uid"] for j in c.custom.list_cluster_custom_object(
            "embedjob.io", "v1alpha1", "embeddingjobs")["items"]}
        for pod in c.core.api_client.sanitize_for_serialization(
                c.core.list_pod_for_all_namespaces().items):
            meta = pod["metadata"]
            owners = [o["uid"] for o in meta.get("ownerReferences") or []]
            if owners and not set(owners) & jobs:  # garbage collection of orphans
                self._kill(meta["name"], signal.SIGKILL)
                c.core.delete_namespaced_pod(meta["name"], meta["namespace"])
                continue
            if meta["name"] not in self.procs and not (pod.get("status") or {}).get("phase"):
                self._run(pod)
            elif meta.get("deletionTimestamp") is None and meta["name"] in self.procs:
                self._report(pod)

    def _run(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns = meta["namespace"]
        term = Path(tempfile.mkstemp(prefix=meta["name"] + "-", suffix=".term")[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDJOB_")}
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
        proc = subprocess.Popen(self.command(pod), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        self.procs[meta["name"]] = (proc, term, pod)
        self._patch(meta["name"], ns, {"spec": {"nodeName": self.node},
                                       "status": {"phase": "Running", "startTime": _now()}})

    def _report(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        proc, term, _ = self.procs[meta["name"]]
        code = proc.poll()
        if code is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        exit_code = 128 - code if code < 0 else code
        reason = "OOMKilled" if meta["name"] in self.oom else (
            "Completed" if exit_code == 0 else "Error")
        message = term.read_text() if term.exists() else ""
        if not message and exit_code:
            message = (proc.stderr.read() if proc.stderr else b"").decode()[-2000:]
        terminated = {"exitCode": exit_code, "reason": reason, "message": message,
                      "finishedAt": _now()}
        self._patch(meta["name"], meta["namespace"], {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "worker", "state": {"terminated": terminated},
                                   "ready": False, "restartCount": 0, "image": "worker",
                                   "imageID": ""}],
        }})

    def _patch(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.cluster.core.patch_namespaced_pod(name, namespace, body)

    def _kill(self, name: str, sig: int) -> None:
        entry = self.procs.get(name)
        if entry and entry[0].poll() is None:
            entry[0].send_signal(sig)

    # --- faults ------------------------------------------------------------------------------

    def evict(self, name: str, namespace: str = "default", grace: float = 10) -> None:
        """Like the kubelet on a spot notice: DisruptionTarget, SIGTERM, grace, SIGKILL."""
        self._patch(name, namespace, {"status": {"conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]}})
        self._kill(name, signal.SIGTERM)
        proc = self.procs[name][0]
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()

    def oom_kill(self, name: str) -> None:
        self.oom.add(name)
        self._kill(name, signal.SIGKILL)

    def lose_node(self, namespace: str = "default") -> None:
        """The node vanishes: its processes die and its pods are deleted."""
        for name, (proc, _, pod) in list(self.procs.items()):
            if proc.poll() is None:
                proc.kill()
                self.cluster.core.delete_namespaced_pod(name, pod["metadata"]["namespace"])
