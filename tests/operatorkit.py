"""The real operator on the real API server, as the Helm chart installs it.

:func:`install_rbac` renders the chart's ServiceAccount, Role and RoleBinding with the
official helm binary (tools/fetch_helm.py) and applies them; :class:`Operator` runs
``python -m embedjob.operator`` with a kubeconfig holding that ServiceAccount's token from
the TokenRequest API, so every call the operator makes is checked against the chart's RBAC.
:class:`Jobs` holds the helpers the scenarios share (one namespace, several jobs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from envtest import ControlPlane
from kubernetes import client, watch

import embedjob
from embedjob import layout
from embedjob.spec import API_GROUP, API_VERSION, PLURAL
from embedjob.store import open_store

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "embedjob"
RELEASE = "embedjob"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}
CREDENTIALS_SECRET = "s3-credentials"


def small_fasta(path: Path, count: int) -> Path:
    """The first ``count`` proteins of the example set (as tests/integration/workerkit.py;
    that module is not importable from this folder)."""
    text = (REPO / "examples" / "data" / "proteins.fa").read_text()
    records = text.split(">")[1:count + 1]
    path.write_text("".join(">" + r for r in records))
    return path


def helm_binary() -> Path:
    spec = importlib.util.spec_from_file_location("fetch_helm", REPO / "tools" / "fetch_helm.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return Path(tool.fetch()) / "helm"


def chart_rbac(namespace: str) -> list[dict[str, Any]]:
    """The chart's ServiceAccount, Role and RoleBinding for a release in ``namespace``."""
    done = subprocess.run(
        [str(helm_binary()), "template", RELEASE, str(CHART), "-n", namespace,
         "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"],
        capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"helm template failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def install_rbac(plane: ControlPlane, namespace: str) -> str:
    """Apply the chart's RBAC in ``namespace``; return the operator's ServiceAccount name."""
    docs = chart_rbac(namespace)
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    return next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")


def service_account_token(api: client.ApiClient, namespace: str, name: str) -> str:
    """A bound token from the TokenRequest API (what a projected volume would hold)."""
    request = client.CoreV1Api(api).create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 3600}})
    return str(request.status.token)


def wait_for(what: Callable[[], Any], timeout: float = 60, step: float = 0.2) -> Any:
    """Poll until ``what()`` is truthy; an exception counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = what()
        except AssertionError:
            raise
        except Exception as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s; last: {last!r}")


@dataclass
class Operator:
    """``python -m embedjob.operator`` as the chart's ServiceAccount, watching one namespace."""

    plane: ControlPlane
    api: client.ApiClient
    namespace: str
    workdir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "operator.log"

    def start(self) -> Operator:
        account = install_rbac(self.plane, self.namespace)
        token = service_account_token(self.api, self.namespace, account)
        kubeconfig = self.plane.token_kubeconfig(token, self.workdir / "operator.kubeconfig",
                                                 namespace=self.namespace)
        config = self.workdir / "operator.yaml"
        config.write_text(yaml.safe_dump({
            "namespaces": [self.namespace], "metricsPort": 0, "livenessPort": 0,
            "statusIntervalSeconds": 0.5, "progressPollSeconds": 1, **self.settings}))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "EMBEDJOB_", "KUBERNETES_"))}
        env |= {**AWS_ENV, "KUBECONFIG": str(kubeconfig), "EMBEDJOB_OPERATOR_CONFIG": str(config)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "embedjob.operator"], env=env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def create_job(custom: client.CustomObjectsApi, namespace: str, name: str,
               spec: dict[str, Any]) -> dict[str, Any]:
    """Apply one EmbeddingJob, as `kubectl apply` would create it."""
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "EmbeddingJob",
            "metadata": {"name": name}, "spec": spec}
    return custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                  body)


@dataclass
class Jobs:
    """EmbeddingJobs, pods and Events of one namespace, through the admin's client."""

    api: client.ApiClient
    namespace: str
    operator: Operator | None = None

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        # The operator deletes worker pods once their shard is recorded: what ran is read
        # from this record of every pod as last seen (a `kubectl get pods -w`).
        self.seen: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._recorder = threading.Thread(target=self._record, daemon=True,
                                          name=f"pods-{self.namespace}")
        self._recorder.start()

    def close(self) -> None:
        """Stop the pod record (before the control plane goes: no thread outlives a test)."""
        self._stop.set()
        self._recorder.join(timeout=15)

    def _record(self) -> None:
        failures = 0
        while failures < 20 and not self._stop.is_set():  # 20 failures: the plane is gone
            try:
                raw = self.core.list_namespaced_pod(self.namespace, _preload_content=False).data
                listed = json.loads(raw)
                for pod in listed["items"]:
                    self.seen[pod["metadata"]["name"]] = pod
                for event in watch.Watch().stream(
                        self.core.list_namespaced_pod, self.namespace, timeout_seconds=5,
                        resource_version=listed["metadata"]["resourceVersion"]):
                    pod = event["raw_object"]
                    self.seen[pod["metadata"]["name"]] = pod
                    if self._stop.is_set():
                        return
                failures = 0
            except Exception:  # a 410, the control plane away for a moment: list again
                failures += 1
                time.sleep(0.5)

    def recorded(self, name: str) -> dict[str, Any]:
        """Pod ``name`` as last seen, deleted or not."""
        wait_for(lambda: name in self.seen, timeout=10)
        return self.seen[name]

    def ran(self, job: str) -> list[str]:
        """Every pod of ``job`` ever seen, deleted or not."""
        return sorted(n for n, p in self.seen.items()
                      if (p["metadata"].get("labels") or {}).get("embedjob.io/job") == job)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return create_job(self.custom, self.namespace, name, spec)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL, name, {"spec": spec},
            _content_type="application/merge-patch+json")

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace,
                                                        PLURAL, name)

    def gone(self, name: str) -> bool:
        """The job no longer exists (deleted, and its finalizer released)."""
        try:
            self.get(name)
        except client.ApiException as err:
            return err.status == 404
        return False

    def delete(self, name: str, propagation: str = "Background") -> None:
        self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace,
                                                    PLURAL, name,
                                                    propagation_policy=propagation)

    def pods(self, job: str) -> list[dict[str, Any]]:
        raw = self.core.list_namespaced_pod(self.namespace, label_selector=f"embedjob.io/job={job}",
                                            _preload_content=False).data
        return list(json.loads(raw)["items"])

    def pod_names(self, job: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.pods(job))

    def pod(self, name: str) -> dict[str, Any]:
        raw = self.core.read_namespaced_pod(name, self.namespace, _preload_content=False).data
        return dict(json.loads(raw))

    def events(self, job: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={job}").items
        return [{"reason": e.reason, "message": e.message, "type": e.type} for e in items]

    def reasons(self, job: str) -> list[str]:
        return [e["reason"] for e in self.events(job)]

    def wait_phase(self, name: str, phase: str, timeout: float = 180) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            job = self.get(name)
            now = (job.get("status") or {}).get("phase")
            if now == phase:
                return job
            if now in ("Failed", "Succeeded") and phase not in ("Failed", "Succeeded"):
                raise AssertionError(f"{name} ended {now}: {job['status']}")
            if now in ("Failed", "Succeeded") and now != phase:
                raise AssertionError(f"{name} ended {now}, not {phase}: {job['status']}")
            return None

        try:
            return wait_for(check, timeout=timeout)
        except AssertionError:
            print(json.dumps(self.get(name).get("status"), indent=1))
            if self.operator is not None:
                print(self.operator.log_tail())
            raise


def condition(job: dict[str, Any], kind: str) -> dict[str, Any]:
    return {c["type"]: c for c in (job.get("status") or {}).get("conditions", [])}.get(kind, {})


def prepare_namespace(api: client.ApiClient, namespace: str) -> None:
    """What a user does before the first job: the S3 credentials Secret; and wait for the
    namespace's default ServiceAccount (pods are refused until the controller made it)."""
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {
        "metadata": {"name": CREDENTIALS_SECRET},
        "stringData": {k: AWS_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    wait_for(lambda: core.read_namespaced_service_account("default", namespace), timeout=60)


@contextlib.contextmanager
def watching(plane: Any, api: client.ApiClient, namespace: str, tmp: Path,
             settings: dict[str, Any] | None = None) -> Iterator[Jobs]:
    """The user's Secret in ``namespace`` and the real operator watching it, stopped after."""
    prepare_namespace(api, namespace)
    operator = Operator(plane, api, namespace, tmp, settings or {}).start()
    jobs = Jobs(api, namespace, operator)
    try:
        yield jobs
    finally:
        jobs.close()
        operator.stop()


def module_jobs(control_plane, admin_api, tmp: Path,
                settings: dict[str, Any] | None = None) -> Iterator[Jobs]:
    """A namespace with the chart's RBAC and an operator watching it."""
    core = client.CoreV1Api(admin_api)
    namespace = f"ej-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        with watching(control_plane, admin_api, namespace, tmp, settings) as jobs:
            yield jobs
    finally:
        core.delete_namespace(namespace, propagation_policy="Background")


def upload_fasta(s3, tmp: Path, count: int, key: str = "in.fa") -> str:
    path = small_fasta(tmp / key, count)
    s3.client.upload_file(str(path), s3.bucket, key)
    return s3.uri(key)


def job_spec(s3, input_uri: str, prefix: str, shards: int = 2, failpoints: str = "",
             **overrides: Any) -> dict[str, Any]:
    """Credentials come from a Secret the kubelet resolves (secretKeyRef), as in a cluster."""
    spec: dict[str, Any] = {
        "input": {"uri": input_uri},
        "output": {"uri": s3.uri(prefix)},
        "model": {"name": "esm2_t6_8M_UR50D", "weights": "random", "maxTokensPerBatch": 2048},
        "shards": shards,
        "checkpoint": {"everySequences": 6},
        "resources": {"cpu": "1", "memory": "2Gi"},
        "storage": {"endpointUrl": s3.endpoint, "region": "us-east-1",
                    "credentialsSecret": CREDENTIALS_SECRET},
    }
    if failpoints:
        spec["template"] = {"env": [{"name": "EMBEDJOB_FAILPOINTS", "value": failpoints}]}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def progress(s3, prefix: str, shard: int) -> dict[str, Any]:
    store = open_store(s3.uri(prefix), s3.storage)
    try:
        return json.loads(store.read_bytes(layout.shard_progress(shard)))
    except Exception:
        return {}


def fasta_ids(path: Path) -> list[str]:
    return [line[1:].split()[0] for line in path.read_text().splitlines()
            if line.startswith(">")]


def assert_output(s3, prefix: str, fasta: Path, tmp: Path) -> None:
    """Every input id exactly once in the job's output."""
    wanted = fasta_ids(fasta)
    cache = tmp / f"cache-{prefix.strip('/')}"
    with embedjob.open(s3.uri(prefix), s3.storage, cache_dir=str(cache)) as out:
        ids = list(out.ids)
        assert len(ids) == len(set(ids)) == len(wanted)
        assert set(ids) == set(wanted)
        assert out.to_numpy().shape == (len(wanted), out.dim)

