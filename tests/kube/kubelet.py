"""A test kubelet (and scheduler) that plays nodes through a REAL API server.

No container runtime here: each pod's container command runs as a local process. What a
kubelet does through the API is done the same way, so the server's own rules apply:

- registers Node objects (cpu, memory, pods, nvidia.com/gpu) and keeps them Ready;
- binds unbound pods through ``pods/binding`` (there is no kube-scheduler), honouring
  ``nodeSelector`` and required node affinity; a pod that fits no node (or is held by the
  test) stays Pending with ``PodScheduled=False/Unschedulable``;
- "pulls" images by a rule (there is no registry): an image under ``unreachable.invalid/`` (a
  reserved, never-resolving domain) cannot be pulled, so its pod stays Pending with
  ``state.waiting`` ``ErrImagePull``, then ``ImagePullBackOff`` until the next try (tries
  back off 1 s, 2 s, ... up to 8 s), as a kubelet whose registry lookup fails; an image name
  that is not a valid reference stays Pending with ``InvalidImageName``;
- resolves env (``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``) from real objects: a
  missing Secret/ConfigMap or key without ``optional: true`` leaves the pod Pending with
  ``CreateContainerConfigError`` and the kubelet's words (``secret "x" not found``), retried
  until it appears; maps volume mounts and the termination-message path to per-pod folders;
- reports through ``pods/status``: Running, then Succeeded/Failed with the container's
  ``state.terminated`` (exit code, reason, the termination message or the log's tail);
- graceful deletion: sees ``deletionTimestamp``, SIGTERM, SIGKILL after the grace period,
  writes the final status, then the final delete (grace 0, uid precondition).

``instant`` (pod -> exit code) runs no process: pods end at once (benchmarks).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

Pod = dict[str, Any]
CAPACITY = {"cpu": "64", "memory": "512Gi", "pods": "250", "nvidia.com/gpu": "8"}
MESSAGE_LIMIT = 4096  # the kubelet's cap on a termination message
LOG_TAIL = 2048
HEARTBEAT_SECONDS = 10.0
UNPULLABLE = "unreachable.invalid/"
PULL_BACKOFF = (1.0, 8.0)  # first and longest wait between two pulls of an unpullable image
# The shape of a docker reference (distribution/reference), lower-case repository path.
REFERENCE = re.compile(r"^(?:(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+)(?::[0-9]+)?/)?"
                       r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                       r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                       r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_command(container: dict[str, Any]) -> list[str]:
    """The image's ``embedjob`` entry point is this interpreter's ``embedjob.cli``."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if argv and argv[0] == "embedjob":
        return [sys.executable, "-m", "embedjob.cli", *argv[1:]]
    return argv


@dataclass
class Running:
    """One pod's local process and its folders."""

    proc: subprocess.Popen[bytes]
    root: Path
    termination: Path
    pod: Pod
    kill_at: float | None = None


@dataclass
class Kubelet:
    api: client.ApiClient
    workdir: Path
    nodes: list[str] = field(default_factory=lambda: ["node-1", "node-2"])
    command: Callable[[dict[str, Any]], list[str]] = default_command
    instant: Callable[[Pod], int] | None = None
    max_grace: float = 30.0
    """Cap on a pod's grace period (a worker that ignores SIGTERM must not stall a test)."""
    poll: float = 0.2

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.procs: dict[str, Running] = {}
        self.done: set[str] = set()  # terminal status written
        self.oom: set[str] = set()
        self.held: set[str] = set()
        self.mute: set[str] = set()  # pods whose termination message is lost
        self.marked: set[str] = set()  # Unschedulable condition written
        self.waiting: dict[str, tuple[str, str]] = {}  # state.waiting written (reason, message)
        self.pulls: dict[str, tuple[int, float]] = {}  # failed pulls, when to try again
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kubelet")
        self._beat = 0.0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Kubelet:
        for node in self.nodes:
            self.register(node)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for run in self.procs.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()

    def register(self, node: str) -> None:
        """Create the Node (if missing) and report it Ready with its capacity."""
        try:
            self.core.create_node({"metadata": {"name": node, "labels": {
                "kubernetes.io/hostname": node, "kubernetes.io/os": "linux"}}})
        except ApiException as err:
            if err.status != 409:
                raise
        self._heartbeat(node)
        if node not in self.nodes:
            self.nodes.append(node)

    def _heartbeat(self, node: str) -> None:
        stamp = now()
        self.core.patch_node_status(node, {"status": {
            "capacity": CAPACITY, "allocatable": CAPACITY,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "test kubelet", "lastHeartbeatTime": stamp,
                            "lastTransitionTime": stamp}]}})

    def log(self, name: str, namespace: str) -> str:
        path = self.workdir / namespace / name / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def started(self, name: str, namespace: str) -> Running | None:
        return self.procs.get(f"{namespace}/{name}")

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._tick()
            except Exception as err:  # a test kubelet that dies silently hides everything
                print(f"kubelet: {type(err).__name__}: {err}", file=sys.stderr)
            self._stop.wait(self.poll)

    def _tick(self) -> None:
        if time.monotonic() - self._beat > HEARTBEAT_SECONDS:
            self._beat = time.monotonic()
            for node in self.nodes:
                self._heartbeat(node)
        raw = self.core.list_pod_for_all_namespaces(_preload_content=False).data
        for pod in json.loads(raw)["items"]:  # raw JSON: the client's models are slow
            self._sync(pod)
        for run in self.procs.values():
            if run.kill_at is not None and time.monotonic() > run.kill_at:
                run.kill_at = None
                if run.proc.poll() is None:
                    run.proc.kill()

    def _sync(self, pod: Pod) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        key = f"{meta['namespace']}/{meta['name']}"
        node = spec.get("nodeName")
        if not node:
            if not meta.get("deletionTimestamp"):
                self._schedule(pod, key)
            return
        if node not in self.nodes:
            return
        if meta.get("deletionTimestamp"):
            self._terminate(pod, key)
        elif key in self.procs:
            self._report(pod, key)
        elif key not in self.done and (pod.get("status") or {}).get("phase") in (None,
                                                                                 "Pending"):
            if self._cannot_pull(pod, key):
                return
            if self.instant is not None:
                self._finish(pod, key, self.instant(pod), started=now())
            else:
                self._run(pod, key)

    # --- scheduling ---------------------------------------------------------------------------

    def _schedule(self, pod: Pod, key: str) -> None:
        target = None if key in self.held else next(
            (n for n in self.nodes if fits(pod["spec"], node_labels(n))), None)
        meta = pod["metadata"]
        if target is None:
            if key not in self.marked:
                self.marked.add(key)
                why = ("Insufficient nvidia.com/gpu" if key in self.held
                       else "node(s) didn't match Pod's node affinity/selector")
                self._status(meta, {"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": f"0/{len(self.nodes)} nodes are available: "
                               f"{len(self.nodes)} {why}.",
                    "lastTransitionTime": now()}]})
            return
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": meta["name"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": target}}
        try:
            self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], body,
                                                    _preload_content=False)
        except ApiException as err:
            if err.status not in (404, 409):  # gone, or bound meanwhile
                raise

    # --- running ------------------------------------------------------------------------------

    def _run(self, pod: Pod, key: str) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        root = self.workdir / meta["namespace"] / meta["name"]
        paths = {m["mountPath"]: root / "volumes" / m["name"]
                 for m in container.get("volumeMounts") or []}
        termination = root / "termination-log"
        paths[container.get("terminationMessagePath") or "/dev/termination-log"] = termination
        for folder in [root / "tmp", *paths.values()]:
            if folder != termination:
                folder.mkdir(parents=True, exist_ok=True)
        try:
            env = self._env(pod, container)
        except LookupError as err:  # the kubelet retries until the Secret/key appears
            self._wait(pod, key, "CreateContainerConfigError", str(err))
            return
        env = {k: _map_path(v, paths) for k, v in env.items()}
        env["TMPDIR"] = str(paths.get("/tmp", root / "tmp"))
        cwd = Path(_map_path(container.get("workingDir") or str(root), paths))
        cwd.mkdir(parents=True, exist_ok=True)
        with open(root / "log", "wb") as log:
            proc = subprocess.Popen(self.command(container), env=env, cwd=cwd, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[key] = Running(proc, root, termination, pod)
        started = now()
        self._status(meta, {"phase": "Running", "startTime": started, "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": started},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": started},
            {"type": "Initialized", "status": "True", "lastTransitionTime": started}],
            "containerStatuses": [_container_status(container, {
                "running": {"startedAt": started}, "waiting": None}, ready=True)]})
        self.waiting.pop(key, None)

    # --- waiting ------------------------------------------------------------------------------

    def _cannot_pull(self, pod: Pod, key: str) -> bool:
        """Whether the pod's image cannot be had: InvalidImageName, or ErrImagePull then
        ImagePullBackOff until the next try, as a kubelet whose registry lookup fails."""
        image = pod["spec"]["containers"][0].get("image", "")
        if not REFERENCE.match(image):
            self._wait(pod, key, "InvalidImageName",
                       f'Failed to apply default image tag "{image}": couldn\'t parse image '
                       f'reference "{image}": invalid reference format')
            return True
        if not image.startswith(UNPULLABLE):
            return False
        tries, retry_at = self.pulls.get(key, (0, 0.0))
        if time.monotonic() >= retry_at:
            self.pulls[key] = (tries + 1, time.monotonic() + min(
                PULL_BACKOFF[0] * 2 ** tries, PULL_BACKOFF[1]))
            self._wait(pod, key, "ErrImagePull",
                       f'failed to pull and unpack image "{image}": failed to resolve '
                       f'reference "{image}": dial tcp: lookup unreachable.invalid: no such host')
        elif self.waiting.get(key, ("",))[0] == "ErrImagePull":
            self._wait(pod, key, "ImagePullBackOff", f'Back-off pulling image "{image}"')
        return True

    def _wait(self, pod: Pod, key: str, reason: str, message: str) -> None:
        """A container that cannot start: Pending, started (the kubelet took the pod), not
        ready, ``state.waiting``; written only when it changes, as a kubelet does."""
        if self.waiting.get(key) == (reason, message):
            return
        self.waiting[key] = (reason, message)
        stamp = now()
        status = pod.get("status") or {}
        self._status(pod["metadata"], {
            "phase": "Pending", "startTime": status.get("startTime") or stamp,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                 "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady",
                 "lastTransitionTime": stamp}],
            "containerStatuses": [_container_status(pod["spec"]["containers"][0], {
                "waiting": {"reason": reason, "message": message}})]})

    def _env(self, pod: Pod, container: dict[str, Any]) -> dict[str, str]:
        """A container's environment: a bare base (no host env leaks in) plus the pod's."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "HOSTNAME": pod["metadata"]["name"], "OMP_NUM_THREADS": "1",
               "AWS_EC2_METADATA_DISABLED": "true"}  # no instance metadata off-cloud
        if "PYTHONPATH" in os.environ:  # the "image" is this checkout: run its code
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            value = self._value_from(pod, item.get("valueFrom") or {})
            if value is not None:
                env[item["name"]] = value
        return env

    def _value_from(self, pod: Pod, source: dict[str, Any]) -> str | None:
        ns = pod["metadata"]["namespace"]
        if ref := source.get("secretKeyRef"):
            return self._key_ref(ref, lambda: self.core.read_namespaced_secret(ref["name"], ns),
                                 "Secret", ns, decode=True)
        if ref := source.get("configMapKeyRef"):
            return self._key_ref(ref, lambda: self.core.read_namespaced_config_map(ref["name"],
                                                                                   ns),
                                 "ConfigMap", ns, decode=False)
        if ref := source.get("fieldRef"):
            return field_value(pod, ref["fieldPath"])
        raise LookupError(f"unsupported valueFrom {sorted(source)}")

    @staticmethod
    def _key_ref(ref: dict[str, Any], read: Callable[[], Any], kind: str, ns: str,
                 decode: bool) -> str | None:
        """The kubelet's rules and words (kubelet_pods.go makeEnvironmentVariables)."""
        try:
            data = read().data or {}
        except ApiException as err:
            if err.status != 404:
                raise LookupError(f"{err.status} {err.reason}") from None
            if ref.get("optional"):
                return None
            raise LookupError(f'{kind.lower()} "{ref["name"]}" not found') from None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise LookupError(f'couldn\'t find key {ref["key"]} in {kind} {ns}/{ref["name"]}')
        value = data[ref["key"]]
        return base64.b64decode(value).decode() if decode else value

    def _report(self, pod: Pod, key: str) -> None:
        run = self.procs[key]
        code = run.proc.poll()
        if code is None or key in self.done:
            return
        exit_code = 128 - code if code < 0 else code
        reason = "OOMKilled" if key in self.oom else ("Completed" if exit_code == 0 else "Error")
        message = run.termination.read_text(errors="replace")[:MESSAGE_LIMIT] \
            if run.termination.exists() and key not in self.mute else ""
        container = pod["spec"]["containers"][0]
        if not message and exit_code and container.get(
                "terminationMessagePolicy") == "FallbackToLogsOnError":
            message = (run.root / "log").read_text(errors="replace")[-LOG_TAIL:]
        self._finish(pod, key, exit_code, started=pod["status"].get("startTime") or now(),
                     reason=reason, message=message)

    def _finish(self, pod: Pod, key: str, exit_code: int, *, started: str,
                reason: str | None = None, message: str = "") -> None:
        """Write the terminal status (phase and the container's ``state.terminated``)."""
        container = pod["spec"]["containers"][0]
        reason = reason or ("Completed" if exit_code == 0 else "Error")
        terminated = {"exitCode": exit_code, "reason": reason, "message": message,
                      "startedAt": started, "finishedAt": now()}
        stamp = now()
        self._status(pod["metadata"], {
            "phase": "Succeeded" if exit_code == 0 else "Failed", "startTime": started,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodCompleted",
                 "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": "False", "reason": "PodCompleted",
                 "lastTransitionTime": stamp}],
            "containerStatuses": [_container_status(container, {
                "running": None, "waiting": None, "terminated": terminated})]})
        self.done.add(key)

    def _terminate(self, pod: Pod, key: str) -> None:
        """Graceful deletion: SIGTERM once, SIGKILL after the grace, final status, delete."""
        meta = pod["metadata"]
        run = self.procs.get(key)
        if run is not None and run.proc.poll() is None:
            if run.kill_at is None:
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                run.kill_at = time.monotonic() + min(float(grace), self.max_grace)
                run.proc.send_signal(signal.SIGTERM)
            return
        if run is not None:
            self._report(pod, key)
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body={
                "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}})
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or a new pod under that name
                raise

    def _status(self, meta: dict[str, Any], status: dict[str, Any]) -> None:
        """Strategic merge patch of pods/status: conditions merge by type, so a
        DisruptionTarget the server wrote stays."""
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"],
                                                  {"status": status})
        except ApiException as err:
            if err.status != 404:
                raise

    # --- what tests do to pods and nodes ------------------------------------------------------

    def hold(self, name: str, namespace: str) -> None:
        """Leave pod ``name`` (created now or later) unschedulable until :meth:`release`."""
        with self._lock:
            self.held.add(f"{namespace}/{name}")

    def lose_message(self, name: str, namespace: str) -> None:
        """Report pod ``name`` (created now or later) without its termination message, as
        when the runtime lost the file (a node restart between the exit and the report)."""
        with self._lock:
            self.mute.add(f"{namespace}/{name}")

    def release(self, name: str, namespace: str) -> None:
        with self._lock:
            self.held.discard(f"{namespace}/{name}")

    def oom_kill(self, name: str, namespace: str) -> None:
        """The kernel's OOM killer: SIGKILL, reported as reason OOMKilled."""
        key = f"{namespace}/{name}"
        with self._lock:
            self.oom.add(key)
            run = self.procs[key]
            if run.proc.poll() is None:
                run.proc.kill()

    def evict(self, name: str, namespace: str) -> None:
        """The Eviction API (policy/v1): the server adds DisruptionTarget and deletes."""
        body = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": name, "namespace": namespace}}
        self.core.create_namespaced_pod_eviction(name, namespace, body, _preload_content=False)

    def disrupt(self, name: str, namespace: str, reason: str = "DeletionByTaintManager") -> None:
        """Like a controller that disrupts a pod: DisruptionTarget via pods/status, then a
        graceful delete."""
        self.core.patch_namespaced_pod_status(name, namespace, {"status": {"conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": reason,
             "message": "test: node is being drained", "lastTransitionTime": now()}]}})
        self.core.delete_namespaced_pod(name, namespace)

    def lose_node(self, node: str) -> list[str]:
        """The node vanishes: its processes die, the Node object is deleted, and so are all
        pods bound to it (as the pod garbage collector does). Returns the pods killed."""
        with self._lock:
            self.nodes.remove(node)
            killed = [k for k, r in self.procs.items()
                      if r.pod["spec"].get("nodeName") == node and r.proc.poll() is None]
            for key in killed:
                self.procs[key].proc.kill()
                self.done.add(key)  # nobody reports for a dead node
            self.core.delete_node(node)
            bound = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}")
            for pod in bound.items:
                try:
                    self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                                    grace_period_seconds=0)
                except ApiException as err:
                    if err.status != 404:
                        raise
            return killed


def _container_status(container: dict[str, Any], state: dict[str, Any],
                      ready: bool = False) -> dict[str, Any]:
    return {"name": container["name"], "image": container.get("image", ""), "imageID": "",
            "ready": ready, "started": ready, "restartCount": 0, "state": state}


def _map_path(value: str, paths: dict[str, Path]) -> str:
    """A container path under a mount (or the termination log) as the host path."""
    for mount, host in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(host) + value[len(mount.rstrip("/")):]
    return value


def node_labels(node: str) -> dict[str, str]:
    return {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux"}


def fits(spec: dict[str, Any], labels: dict[str, str]) -> bool:
    """nodeSelector and required node affinity (In, NotIn, Exists, DoesNotExist)."""
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    return not terms or any(_term_matches(t, labels) for t in terms)


def _term_matches(term: dict[str, Any], labels: dict[str, str]) -> bool:
    for expr in term.get("matchExpressions") or []:
        value, op = labels.get(expr["key"]), expr["operator"]
        values = expr.get("values") or []
        ok = {"In": value in values, "NotIn": value not in values,
              "Exists": value is not None, "DoesNotExist": value is None}.get(op, False)
        if not ok:
            return False
    return True


def field_value(pod: Pod, path: str) -> str:
    """The downward API's fieldRef paths a kubelet supports for env."""
    meta = pod["metadata"]
    simple = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": pod["spec"].get("nodeName"),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName"),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
    if path in simple:
        return simple[path] or ""
    for kind in ("labels", "annotations"):
        prefix = f"metadata.{kind}['"
        if path.startswith(prefix) and path.endswith("']"):
            return (meta.get(kind) or {}).get(path[len(prefix):-2], "")
    raise LookupError(f"unsupported fieldRef {path}")
