"""The real-API-server tier: one control plane per test run, one namespace per test.

Skipped, with a one-line reason, only when ``KUBEBUILDER_ASSETS`` is unset; under CI (``CI`` set)
an unset variable is an error, so the tier can never quietly stop running there.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from envtest import ControlPlane, assets_folder, start_control_plane
from kubelet import Kubelet
from kubernetes import client, config

from embedjob.spec import API_GROUP

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "embeddingjob.yaml"


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    assets = assets_folder()
    if assets is None:
        if os.environ.get("CI"):
            pytest.fail("KUBEBUILDER_ASSETS is unset under CI: the real API server tier must run "
                        "(.ci/run sets it from ../shared/envtest/install.sh)")
        pytest.skip("KUBEBUILDER_ASSETS unset: the real API server tier needs etcd and "
                    "kube-apiserver (`setup-envtest use`, or ../shared/envtest/install.sh)")
    plane = start_control_plane(assets)
    try:
        yield plane
    finally:
        plane.stop()
        shutil.rmtree(plane.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def admin_api(control_plane: ControlPlane) -> client.ApiClient:
    """A client with system:masters powers (the cluster admin, not the operator)."""
    return config.new_client_from_config(str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def crd_installed(control_plane: ControlPlane) -> str:
    """Apply the generated CRD and wait until the server serves it."""
    control_plane.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
    name = f"embeddingjobs.{API_GROUP}"
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
    return name


@pytest.fixture
def namespace(control_plane: ControlPlane, admin_api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace; deleted afterwards (the namespace controller empties it)."""
    core = client.CoreV1Api(admin_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture(scope="session")
def kubelet(control_plane: ControlPlane, admin_api: client.ApiClient,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubelet]:
    """Two nodes played through the API (tests/kube/kubelet.py); pods run as processes."""
    node = Kubelet(admin_api, tmp_path_factory.mktemp("kubelet")).start()
    try:
        yield node
    finally:
        node.stop()
