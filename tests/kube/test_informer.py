"""The operator's pod informer (embedjob/operator/informer.py) against the real API server:
server-side selection, pagination, watch add/modify/delete, and a relist after 410 Gone."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envtest import ControlPlane, assets_folder, start_control_plane
from kubernetes import client, config

from embedjob.operator.informer import PodInformer
from embedjob.operator.names import (
    LABEL_ATTEMPT,
    LABEL_JOB_UID,
    LABEL_ROLE,
    LABEL_SHARD,
    ROLE_WORKER,
)

JOB = "uid-a"


def pod(name: str, shard: int | None = None) -> dict[str, Any]:
    """A pod of job JOB (``shard`` given), or a stranger without our job-uid label."""
    labels = {LABEL_ROLE: ROLE_WORKER, LABEL_ATTEMPT: "0"}
    if shard is not None:
        labels |= {LABEL_JOB_UID: JOB, LABEL_SHARD: str(shard)}
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}


async def until(check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s")


@contextlib.asynccontextmanager
async def running(informer: PodInformer, resume_from: str | None = None
                  ) -> AsyncIterator[PodInformer]:
    """The informer started (on this loop), and stopped however the test ends."""
    informer.start(resume_from)
    try:
        yield informer
    finally:
        informer.stop()


def phases(informer: PodInformer) -> dict[str, str]:
    return {p.name: p.phase for p in informer.get(JOB)}


@pytest.mark.asyncio
async def test_lists_in_pages_then_watches_only_our_pods(
        admin_api: client.ApiClient, control_plane: ControlPlane, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    for shard in range(5):
        core.create_namespaced_pod(namespace, pod(f"w-{shard}", shard))
    for other in range(2):
        core.create_namespaced_pod(namespace, pod(f"stranger-{other}"))
    woken: list[set[str]] = []
    informer = PodInformer([namespace], woken.append, page_size=2,
                           kubeconfig=str(control_plane.kubeconfig))
    async with running(informer):
        await asyncio.wait_for(informer.synced(), 30)
        assert sorted(phases(informer)) == [f"w-{s}" for s in range(5)]
        # 2 + 2 + 1 of our pods: the server filtered (all 7 pods would take 4 pages).
        assert informer.pages == 3 and informer.lists == 1
        assert set(informer.store.by_job) == {JOB} and {JOB} in woken

        core.create_namespaced_pod(namespace, pod("w-5", 5))
        core.create_namespaced_pod(namespace, pod("stranger-2"))
        await until(lambda: "w-5" in phases(informer))
        core.patch_namespaced_pod_status("w-5", namespace, {"status": {"phase": "Running"}})
        await until(lambda: phases(informer).get("w-5") == "Running")
        core.delete_namespaced_pod("w-0", namespace, grace_period_seconds=0)
        await until(lambda: "w-0" not in phases(informer))
        assert sorted(phases(informer)) == [f"w-{s}" for s in range(1, 6)]
        assert set(informer.store.by_job) == {JOB}  # the strangers were never delivered
        assert informer.lists == 1 and informer.expired == 0


@pytest.fixture(scope="module")
def uncached() -> Iterator[tuple[ControlPlane, client.ApiClient]]:
    """A control plane of its own whose API server serves watches from etcd (no watch
    cache): there, etcd's compaction makes an old resourceVersion really expire."""
    assets = assets_folder()
    if assets is None:
        pytest.skip("KUBEBUILDER_ASSETS unset")
    plane = start_control_plane(assets, ("--watch-cache=false",), controllers=False)
    try:
        yield plane, config.new_client_from_config(str(plane.kubeconfig))
    finally:
        plane.stop()
        shutil.rmtree(plane.folder, ignore_errors=True)


@pytest.mark.asyncio
async def test_an_expired_resource_version_leads_to_a_new_list(
        uncached: tuple[ControlPlane, client.ApiClient]) -> None:
    plane, api = uncached
    core = client.CoreV1Api(api)
    namespace = "default"
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "default"}})
    before = core.list_namespaced_pod(namespace).metadata.resource_version
    for shard in range(3):
        core.create_namespaced_pod(namespace, pod(f"w-{shard}", shard))
    plane.compact_etcd()  # as the API server does every 5 minutes
    informer = PodInformer([namespace], lambda uids: None, kubeconfig=str(plane.kubeconfig))
    # Resuming where a watch stopped before the pods existed, now compacted away: the
    # server answers 410 Gone, and only the list that follows can show the pods.
    async with running(informer, resume_from=before):
        await asyncio.wait_for(informer.synced(), 30)
        assert informer.expired == 1 and informer.lists == 1
        assert sorted(phases(informer)) == ["w-0", "w-1", "w-2"]
        core.delete_namespaced_pod("w-1", namespace, grace_period_seconds=0)
        await until(lambda: "w-1" not in phases(informer))  # and it watches again


@pytest.mark.asyncio
async def test_a_new_watch_process_replaces_one_that_died(
        admin_api: client.ApiClient, control_plane: ControlPlane, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    for shard in range(3):
        core.create_namespaced_pod(namespace, pod(f"w-{shard}", shard))
    informer = PodInformer([namespace], lambda uids: None,
                           kubeconfig=str(control_plane.kubeconfig))
    async with running(informer):
        await asyncio.wait_for(informer.synced(), 30)
        assert informer._child is not None
        informer._child[0].kill()
        # Changed while no process watched: only the new process's list can show it.
        core.delete_namespaced_pod("w-0", namespace, grace_period_seconds=0)
        core.create_namespaced_pod(namespace, pod("w-3", 3))
        await until(lambda: sorted(phases(informer)) == ["w-1", "w-2", "w-3"])
        assert informer.started == 2 and informer.lists == 2
        core.delete_namespaced_pod("w-1", namespace, grace_period_seconds=0)
        await until(lambda: "w-1" not in phases(informer))  # and it watches again


@pytest.mark.asyncio
async def test_a_refused_watch_is_said_and_retried(
        control_plane: ControlPlane, namespace: str, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    kubeconfig = control_plane.token_kubeconfig("not-a-token", tmp_path / "bad.kubeconfig")
    informer = PodInformer([namespace], lambda uids: None, kubeconfig=str(kubeconfig))
    async with running(informer):
        said = ""
        deadline = time.monotonic() + 30
        while "reconnecting in 2 s" not in said and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            said += capfd.readouterr().err
        # The child's one line, then again after the backoff (1 s, then 2 s): never silent.
        assert f"pod list/watch in namespace {namespace} failed: 401 Unauthorized" in said
        assert "reconnecting in 1 s" in said and "reconnecting in 2 s" in said
        assert not informer._synced.is_set() and informer.started == 1
