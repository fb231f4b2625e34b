"""Helpers of the kind end-to-end suite: tools, the cluster handle, image builds, polling."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("EMBEDJOB_E2E_CLUSTER", "embedjob-e2e")
KEEP = os.environ.get("EMBEDJOB_E2E_KEEP") == "1"  # leave the cluster up for debugging
NAMESPACE = "embedjob"
OPERATOR_IMAGE = "embedjob-operator:e2e"
WORKER_IMAGE = "embedjob-worker:e2e"


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def _fetched_tools() -> Path | None:
    spec = importlib.util.spec_from_file_location("fetch_helm", ROOT / "tools" / "fetch_helm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.fetch()
    except module.FetchError:
        return None


def _tool(name: str) -> str | None:
    if found := shutil.which(name):
        return found
    fetched = _fetched_tools() if name in ("helm", "kubectl") else None
    return str(fetched / name) if fetched else None


def missing_requirement() -> str | None:
    """Why the suite cannot run here, or None."""
    if os.environ.get("EMBEDJOB_E2E") == "0":
        return "EMBEDJOB_E2E=0"
    for name in ("kind", "docker", "helm", "kubectl"):
        if _tool(name) is None:
            return f"{name} not found (the e2e suite needs kind, docker, helm and kubectl)"
    info = _run([str(_tool("docker")), "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        return "no Docker engine reachable (`docker info` failed)"
    return None


@dataclass
class Cluster:
    """kubectl/helm bound to the kind cluster's kubeconfig."""

    kubeconfig: Path
    kubectl_bin: str
    helm_bin: str

    def _env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = _run([self.kubectl_bin, *args], input=stdin, env=self._env(), timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = _run([self.helm_bin, *args], env=self._env(), timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)}: {result.stderr.strip()}")
        return result

    def apply(self, manifest: dict[str, Any] | str, namespace: str = NAMESPACE) -> None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        self.kubectl("apply", "-n", namespace, "-f", "-", stdin=text)

    def get(self, kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        result = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def wait(self, *args: str, timeout: int = 300) -> None:
        self.kubectl("wait", "-n", NAMESPACE, f"--timeout={timeout}s", *args, timeout=timeout + 30)

    def logs(self, pod: str) -> str:
        return self.kubectl("logs", "-n", NAMESPACE, pod, check=False).stdout


def _docker_build(dockerfile: str, tag: str, *build_args: str) -> None:
    cmd = ["docker", "build", "-f", str(ROOT / dockerfile), "-t", tag, *build_args, str(ROOT)]
    result = _run(cmd, timeout=3600)
    assert result.returncode == 0, f"docker build {dockerfile} failed:\n{result.stderr[-4000:]}"


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 2.0) -> Any:
    """Poll until predicate() is truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
