"""A real cluster for the end-to-end suite: kind, both images built and loaded, MinIO and
the chart installed. Skipped, with the reason, wherever kind or a Docker engine is missing.

Run:  pytest tests/e2e -m e2e        (see tests/e2e/README.md for the knobs)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from e2e_cluster import (
    CLUSTER,
    KEEP,
    NAMESPACE,
    OPERATOR_IMAGE,
    ROOT,
    WORKER_IMAGE,
    Cluster,
    _docker_build,
    _run,
    _tool,
    missing_requirement,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = [item for item in items if "e2e" in item.keywords]
    if not e2e:
        return
    reason = missing_requirement()
    if reason:
        for item in e2e:
            item.add_marker(pytest.mark.skip(reason=f"e2e: {reason}"))


@pytest.fixture(scope="session")
def kind_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    kind = str(_tool("kind"))
    existing = _run([kind, "get", "clusters"], timeout=60).stdout.split()
    created = CLUSTER not in existing
    if created:
        result = _run([kind, "create", "cluster", "--name", CLUSTER, "--wait", "180s"], timeout=600)
        assert result.returncode == 0, f"kind create cluster failed: {result.stderr[-2000:]}"
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(_run([kind, "get", "kubeconfig", "--name", CLUSTER], timeout=60).stdout)
    try:
        yield Cluster(kubeconfig, str(_tool("kubectl")), str(_tool("helm")))
    finally:
        if created and not KEEP:
            _run([kind, "delete", "cluster", "--name", CLUSTER], timeout=300)


@pytest.fixture(scope="session")
def images(kind_cluster: Cluster) -> None:
    """Build both images from this checkout and load them into the kind nodes."""
    # The default worker base is a CUDA PyTorch image (GBs); a CPU-only base is enough
    # here: EMBEDJOB_E2E_PYTORCH_IMAGE overrides it.
    worker_args = []
    if base := os.environ.get("EMBEDJOB_E2E_PYTORCH_IMAGE"):
        worker_args = ["--build-arg", f"PYTORCH_IMAGE={base}"]
    _docker_build("Dockerfile.operator", OPERATOR_IMAGE)
    _docker_build("Dockerfile.worker", WORKER_IMAGE, *worker_args)
    for image in (OPERATOR_IMAGE, WORKER_IMAGE):
        result = _run(["kind", "load", "docker-image", image, "--name", CLUSTER], timeout=1800)
        assert result.returncode == 0, f"kind load {image}: {result.stderr[-2000:]}"


@pytest.fixture(scope="session")
def installed(kind_cluster: Cluster, images: None) -> Iterator[Cluster]:
    """MinIO and the chart (examples/minio/values.yaml) in one namespace."""
    k = kind_cluster
    k.kubectl("create", "namespace", NAMESPACE, check=False)
    k.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples/minio/minio.yaml"))
    k.wait("--for=condition=Available", "deployment/minio")
    k.wait("--for=condition=Complete", "job/minio-make-bucket")
    k.helm(
        "upgrade",
        "--install",
        "embedjob",
        str(ROOT / "charts/embedjob"),
        "-n",
        NAMESPACE,
        "-f",
        str(ROOT / "examples/minio/values.yaml"),
        "--set",
        f"image.repository={OPERATOR_IMAGE.split(':')[0]}",
        "--set",
        f"image.tag={OPERATOR_IMAGE.split(':')[1]}",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        f"worker.image.repository={WORKER_IMAGE.split(':')[0]}",
        "--set",
        f"worker.image.tag={WORKER_IMAGE.split(':')[1]}",
        # Short enough for a quick test, long enough for the final checkpoint flush.
        "--set",
        "worker.terminationGracePeriodSeconds=30",
        "--wait",
        "--timeout",
        "5m",
    )
    try:
        yield k
    finally:
        if not KEEP:
            k.helm("uninstall", "embedjob", "-n", NAMESPACE)
