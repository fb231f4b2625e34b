"""An instant kubelet for benchmarks: one watch, a pool of writers, no processes.

tests/kube/kubelet.py lists every pod each 0.2 s, which at 10,000 pods costs the API server
more than the operator under test. This one plays one Node through the real API server:

- one raw watch on the namespace's pods (list, then watch from its resourceVersion; relist
  on 410 Gone); the local time each pod is first seen is kept (``seen``), so the bench times
  pod creation and replacement as a watcher sees them, not by creationTimestamp (whole
  seconds on a real API server);
- a pool of writer threads: each new pod is bound through ``pods/binding`` and reported
  through ``pods/status`` at once — index and finalize pods Succeeded (exit 0), workers
  Running (they stay running until :meth:`fail` ends them);
- pods with a deletionTimestamp are deleted for good (grace 0, uid precondition).

Writes go straight through urllib3 (the client's own pool, pre-encoded JSON): the
kubernetes client's per-call model handling costs more CPU than the API server's work on
this 2-core machine. Its own requests are counted by verb (``requests``).
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import sys
import threading
import time
from collections import Counter
from typing import Any

from kubernetes import client, config

Pod = dict[str, Any]
CAPACITY = {"cpu": "100000", "memory": "100000Gi", "pods": "1000000", "nvidia.com/gpu": "100000"}
ROLE = "embedjob.io/role"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class InstantKubelet:
    """One Node in ``namespace``; workers stay Running, index/finalize pods succeed."""

    def __init__(self, kubeconfig: str, namespace: str, node: str = "bench-node",
                 writers: int = 8) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = writers + 2  # one keep-alive connection per thread
        self.api = client.ApiClient(cfg)
        self.namespace, self.node = namespace, node
        self.core = client.CoreV1Api(self.api)
        self.host = cfg.host
        self.pool = self.api.rest_client.pool_manager
        self.seen: dict[str, float] = {}  # pod name -> monotonic time first seen
        self.pods: dict[str, Pod] = {}  # latest object per name (live pods only)
        self.failed_at: dict[str, float] = {}  # pod name -> monotonic time its Failed was written
        self.running_at: dict[str, float] = {}  # pod name -> when its Running was written
        self.requests: Counter[str] = Counter()
        self.errors: list[str] = []
        self.handled: set[str] = set()  # pod uids already bound/reported
        self._queue: queue.Queue[Pod | None] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._watch, daemon=True, name="kubelet-watch")]
        self._threads += [threading.Thread(target=self._write, daemon=True, name=f"kubelet-{i}")
                          for i in range(writers)]

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> InstantKubelet:
        self._call("POST", "/api/v1/nodes", {"metadata": {"name": self.node, "labels": {
            "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"}}}, ok=(409,))
        stamp = now()
        self._call("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": {
            "capacity": CAPACITY, "allocatable": CAPACITY,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "bench kubelet", "lastHeartbeatTime": stamp,
                            "lastTransitionTime": stamp}]}})
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)

    def fail(self, names: list[str], exit_code: int = 143) -> None:
        """End these running pods as the node would after SIGTERM (a preemption)."""
        for name in names:
            pod = self.pods[name]
            self._report(pod, "Failed", exit_code)
            self.failed_at[name] = time.monotonic()

    def running_workers(self) -> list[str]:
        with self._lock:
            return sorted(n for n, p in self.pods.items()
                          if (p["metadata"].get("labels") or {}).get(ROLE) == "worker"
                          and p["spec"].get("nodeName")
                          and (p.get("status") or {}).get("phase") == "Running")

    # --- the watch ----------------------------------------------------------------------------

    def _watch(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._list()
                version = self._follow(version)
            except Exception as err:  # a silent kubelet hides everything: say it, go on
                if self._stop.is_set():
                    return  # the API server is going away with the bench
                self.errors.append(f"watch: {type(err).__name__}: {err}")
                print(f"bench kubelet: watch: {type(err).__name__}: {err}", file=sys.stderr)
                version = ""
                time.sleep(0.5)

    def _list(self) -> str:
        self.requests["list"] += 1
        raw = self.core.list_namespaced_pod(self.namespace, _preload_content=False).data
        doc = json.loads(raw)
        for pod in doc["items"]:
            self._saw(pod, deleted=False)
        return str(doc["metadata"]["resourceVersion"])

    def _follow(self, version: str) -> str:
        """One watch request; returns the version to resume from ("" to relist)."""
        self.requests["watch"] += 1
        resp = self.core.list_namespaced_pod(
            self.namespace, watch=True, resource_version=version, allow_watch_bookmarks=True,
            timeout_seconds=60, _preload_content=False, _request_timeout=(5, 90))
        buffer = b""
        try:
            for chunk in resp.stream(1 << 16, decode_content=False):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        return "" if obj.get("code") == 410 else version
                    version = obj["metadata"].get("resourceVersion", version)
                    if event["type"] != "BOOKMARK":
                        self._saw(obj, deleted=event["type"] == "DELETED")
                if self._stop.is_set():
                    break
        finally:
            resp.release_conn()
        return version

    def _saw(self, pod: Pod, deleted: bool) -> None:
        meta = pod["metadata"]
        name = meta["name"]
        with self._lock:
            self.seen.setdefault(name, time.monotonic())
            if deleted:
                self.pods.pop(name, None)
                return
            self.pods[name] = pod
        if meta.get("deletionTimestamp"):
            self._queue.put(pod)
        elif meta["uid"] not in self.handled and not pod["spec"].get("nodeName"):
            self.handled.add(meta["uid"])
            self._queue.put(pod)

    # --- the writers --------------------------------------------------------------------------

    def _write(self) -> None:
        while True:
            pod = self._queue.get()
            if pod is None or self._stop.is_set():
                return
            try:
                if pod["metadata"].get("deletionTimestamp"):
                    self._delete(pod)
                else:
                    self._start(pod)
            except Exception as err:
                self.errors.append(f"{pod['metadata']['name']}: {type(err).__name__}: {err}")
                print(f"bench kubelet: {pod['metadata']['name']}: {type(err).__name__}: {err}",
                      file=sys.stderr)

    def _call(self, method: str, path: str, body: dict[str, Any],
              ok: tuple[int, ...] = ()) -> int:
        """One request; statuses in ``ok`` are expected outcomes, others raise."""
        kind = "application/strategic-merge-patch+json" if method == "PATCH" \
            else "application/json"
        resp = self.pool.request(method, self.host + path, body=json.dumps(body).encode(),
                                 headers={"Content-Type": kind, "Accept": "application/json"},
                                 timeout=60.0, retries=False)
        if resp.status >= 400 and resp.status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {resp.data[:300]!r}")
        return int(resp.status)

    def _pod_path(self, name: str, sub: str = "") -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{name}" + (f"/{sub}" if sub else "")

    def _start(self, pod: Pod) -> None:
        meta = pod["metadata"]
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": meta["name"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}}
        self.requests["create"] += 1
        status = self._call("POST", self._pod_path(meta["name"], "binding"), body,
                            ok=(404, 409))
        if status in (404, 409):  # gone, or bound meanwhile
            return
        role = (meta.get("labels") or {}).get(ROLE)
        if role == "worker":
            self._report(pod, "Running")
            self.running_at[meta["name"]] = time.monotonic()
        else:
            self._report(pod, "Succeeded", 0)

    def _report(self, pod: Pod, phase: str, exit_code: int | None = None) -> None:
        container = pod["spec"]["containers"][0]
        stamp = now()
        ready = phase == "Running"
        if ready:
            state: dict[str, Any] = {"running": {"startedAt": stamp}}
        else:
            state = {"running": None, "waiting": None, "terminated": {
                "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                "message": "", "startedAt": stamp, "finishedAt": stamp}}
        flag = "True" if ready else "False"
        status = {"phase": phase, "startTime": stamp, "conditions": [
            {"type": "Ready", "status": flag, "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp}],
            "containerStatuses": [{
                "name": container["name"], "image": container.get("image", ""), "imageID": "",
                "ready": ready, "started": ready, "restartCount": 0, "state": state}]}
        self.requests["patch"] += 1
        self._call("PATCH", self._pod_path(pod["metadata"]["name"], "status"),
                   {"status": status}, ok=(404,))

    def _delete(self, pod: Pod) -> None:
        meta = pod["metadata"]
        self.requests["delete"] += 1
        self._call("DELETE", self._pod_path(meta["name"]), {
            "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}, ok=(404, 409))
