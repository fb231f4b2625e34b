"""Fixtures of the end-to-end suite: a real cluster, moto's S3 where pods reach it, and the
real operator as the chart's ServiceAccount.

Skipped, with the reason, when ``EMBEDJOB_E2E_KUBECONFIG`` is unset; under CI with
../shared/realnode present, .ci/run starts the node and sets it, and an unset variable fails.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_cluster import HOST_IP, KUBECONFIG_ENV, ROOT, WORKER_IMAGE, Cluster, missing_requirement
from kubernetes import client, config
from operatorkit import AWS_ENV, Jobs, watching

from embedjob.spec import StorageSpec
from embedjob.store import s3_client


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = [item for item in items if "e2e" in item.keywords]
    reason = missing_requirement() if e2e else None
    if reason is None:
        return
    if os.environ.get("CI") and (ROOT.parent / "shared" / "realnode").is_dir():
        raise pytest.UsageError(f"e2e under CI: {reason}")
    for item in e2e:
        item.add_marker(pytest.mark.skip(reason=f"e2e: {reason}"))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return Cluster(Path(os.environ[KUBECONFIG_ENV]))


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    """The generated CRD, applied as docs/install.md says."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                    str(ROOT / "crds" / "embeddingjob.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/embeddingjobs.embedjob.io")


@pytest.fixture(scope="session")
def admin_api(cluster: Cluster) -> client.ApiClient:
    return config.new_client_from_config(str(cluster.kubeconfig))


@dataclass
class S3:
    endpoint: str
    bucket: str
    storage: StorageSpec

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.lstrip('/')}"

    @property
    def client(self) -> Any:
        return s3_client(self.storage)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """moto's server on the address pods reach this machine at, and one bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        server = ThreadedMotoServer(ip_address=HOST_IP, port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = S3(endpoint, "e2e", StorageSpec(endpoint_url=endpoint, region="us-east-1"))
        bucket.client.create_bucket(Bucket=bucket.bucket)
        try:
            yield bucket
        finally:
            server.stop()


@pytest.fixture(scope="module")
def jobs(cluster: Cluster, crd: None, admin_api: client.ApiClient, s3: S3,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    """A namespace with the chart's RBAC and the real operator watching it."""
    core = client.CoreV1Api(admin_api)
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    small = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    settings = {"workerImage": WORKER_IMAGE, "progressPollSeconds": 2,
                "indexResources": small, "finalizeResources": small,  # fit a 2-core node
                "workerDefaults": {"terminationGracePeriodSeconds": 30,
                                   "ephemeralStorage": "100Mi"}}
    try:
        with watching(cluster, admin_api, namespace, tmp_path_factory.mktemp("operator"),
                      settings) as jobs:
            yield jobs
    finally:
        core.delete_namespace(namespace, propagation_policy="Background")
