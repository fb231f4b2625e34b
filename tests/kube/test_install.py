"""Install and uninstall on a real API server: the chart under Pod Security `restricted`, the
chart's RBAC for exactly what the operator calls, and the documented uninstall recovery."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from envtest import ControlPlane, start_control_plane
from kubernetes import client
from operatorkit import REPO

from embedjob.operator.config import OperatorSettings
from embedjob.operator.pods import build_pod
from embedjob.operator.rbac import REQUIRED_RULES
from embedjob.operator.views import ROLE_WORKER, job_view
from embedjob.policy import ShardHistory

CHART = REPO / "charts" / "embedjob"
RELEASE = "embedjob"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/warn": "restricted"}


@pytest.fixture(scope="module")
def helm() -> Path:
    import importlib.util
    spec = importlib.util.spec_from_file_location("fetch_helm", REPO / "tools" / "fetch_helm.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        return tool.fetch() / "helm"
    except tool.FetchError as err:
        pytest.skip(f"no helm binary: {err}")


def render(helm: Path, namespace: str) -> list[dict[str, Any]]:
    """The chart as `helm install -n NAMESPACE` would apply it (CRDs are installed apart)."""
    done = subprocess.run([str(helm), "template", RELEASE, str(CHART), "-n", namespace],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def restricted_namespace(core: client.CoreV1Api, namespace: str) -> None:
    core.patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})


def test_chart_passes_a_server_side_dry_run_under_restricted(
        control_plane: ControlPlane, admin_api, crd_installed, namespace, helm) -> None:
    restricted_namespace(client.CoreV1Api(admin_api), namespace)
    docs = render(helm, namespace)
    done = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump_all(docs), check=False)
    assert done.returncode == 0, done.stderr
    assert "PodSecurity" not in done.stderr, done.stderr  # warnings for the Deployment's pods
    # Pod Security only warns on a Deployment: its pod is what `enforce` judges.
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]  # the pod needs its account
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(accounts))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator-pod"},
           "spec": deployment["spec"]["template"]["spec"]}
    done = control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=json.dumps(pod), check=False)
    assert done.returncode == 0, done.stderr


def _install(plane: ControlPlane, helm: Path, namespace: str) -> str:
    docs = render(helm, namespace)
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount" and "worker" not in
             d["metadata"]["name"]]
    return f"system:serviceaccount:{namespace}:{sa['metadata']['name']}"


def test_operator_account_can_do_exactly_what_the_operator_calls(
        control_plane: ControlPlane, admin_api, crd_installed, namespace, helm) -> None:
    """The chart's RBAC, as the operator's ServiceAccount: every needed verb, and pods that
    name the job as a blocking owner (OwnerReferencesPermissionEnforcement is on)."""
    core = client.CoreV1Api(admin_api)
    restricted_namespace(core, namespace)
    user = _install(control_plane, helm, namespace)
    for rule in REQUIRED_RULES:
        for resource in rule["resources"]:
            group = rule["apiGroups"][0]
            plural, _, sub = resource.partition("/")
            target = f"{plural}.{group}" if group else plural
            for verb in rule["verbs"]:
                done = control_plane.kubectl("auth", "can-i", verb, target, "-n", namespace,
                                             f"--subresource={sub}", "--as", user, check=False)
                assert done.stdout.strip() == "yes", f"{user} cannot {verb} {resource}"
    for verb, target in (("list", "secrets"), ("watch", "secrets"),
                         ("update", "embeddingjobs.embedjob.io")):
        done = control_plane.kubectl("auth", "can-i", verb, target, "-n", namespace,
                                     "--as", user, check=False)
        assert done.stdout.strip() == "no", f"{user} may {verb} {target}: more than needed"
    job = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
           "metadata": {"name": "owner", "namespace": namespace},
           "spec": {"input": {"uri": "in.fa"}, "output": {"uri": "out/"}}}
    stored = control_plane.kubectl("create", "-f", "-", "-o", "json",
                                   input=json.dumps(job)).stdout
    pod = build_pod(job_view(json.loads(stored)), ROLE_WORKER, 0, 0, ShardHistory(),
                    OperatorSettings())
    assert pod["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
    done = control_plane.kubectl("create", "--dry-run=server", "--as", user, "-f", "-",
                                 input=json.dumps(pod), check=False)
    assert done.returncode == 0, done.stderr  # also: a worker pod passes `restricted`


# --- uninstall ------------------------------------------------------------------------------


def documented_recovery() -> str:
    """The finalizer-removal command from docs/install.md (tested verbatim)."""
    text = (REPO / "docs" / "install.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "finalizers" in b and "kubectl patch" in b]
    assert len(found) == 1, "docs/install.md: one sh block patching the finalizers away"
    return found[0]


@pytest.fixture
def private_plane(control_plane: ControlPlane):
    """A control plane of its own: this test deletes the CRD, which others rely on."""
    plane = start_control_plane(control_plane.assets)
    try:
        yield plane
    finally:
        plane.stop()
        shutil.rmtree(plane.folder, ignore_errors=True)


def test_documented_recovery_unblocks_a_hanging_crd_delete(private_plane: ControlPlane) -> None:
    plane = private_plane
    crd = "crd/embeddingjobs.embedjob.io"
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "embeddingjob.yaml"))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", crd)
    plane.kubectl("create", "namespace", "team")
    job = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
           "metadata": {"name": "left-behind", "namespace": "team",
                        # what the operator (kopf) puts on every job it has seen
                        "finalizers": ["embedjob.io/finalizer"]},
           "spec": {"input": {"uri": "in.fa"}, "output": {"uri": "out/"}}}
    plane.kubectl("create", "-f", "-", input=json.dumps(job))
    # No operator runs: deleting the CRD hangs on the job's finalizer.
    plane.kubectl("delete", crd, "--wait=false")
    done = plane.kubectl("wait", "--for=delete", "--timeout=3s", crd, check=False)
    assert done.returncode != 0, "the CRD went away although a job kept its finalizer"
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig),
           "PATH": f"{plane.assets}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_recovery()], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    plane.kubectl("wait", "--for=delete", "--timeout=60s", crd)
