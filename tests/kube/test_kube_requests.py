"""Requests on a job through annotations, and a damaged shard found by the finalize step, on
a REAL API server with REAL worker processes and moto's S3 (as test_kube_scenarios.py).

``embedjob.io/retry-failed`` on a Failed job re-runs its failed shard once and the job
Succeeds; on a Succeeded job it is a one-line Warning. A shard file damaged between its
worker's publish and the finalize step is reset by finalize, embedded again and finalized
again. ``embedjob.io/restart`` stops every pod, the index step deletes the earlier output,
and the job runs again from scratch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubelet import Kubelet
from operatorkit import Jobs, assert_output, job_spec, module_jobs, upload_fasta, wait_for

from embedjob import layout
from embedjob.operator.names import ANN_RESTART, ANN_RETRY_FAILED
from embedjob.spec import API_GROUP, API_VERSION, PLURAL
from embedjob.store import open_store

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def jobs(control_plane, admin_api, crd_installed, kubelet, tmp_path_factory) -> Iterator[Jobs]:
    yield from module_jobs(control_plane, admin_api, tmp_path_factory.mktemp("operator"))


def annotate(jobs: Jobs, name: str, key: str, value: str) -> None:
    """What ``kubectl annotate --overwrite ej NAME KEY=VALUE`` sends."""
    jobs.custom.patch_namespaced_custom_object(
        API_GROUP, API_VERSION, jobs.namespace, PLURAL, name,
        {"metadata": {"annotations": {key: value}}},
        _content_type="application/merge-patch+json")


def requests(jobs: Jobs, name: str) -> dict[str, Any]:
    return dict((jobs.get(name).get("status") or {}).get("requests") or {})


def events(jobs: Jobs, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in jobs.events(name) if e["reason"] == reason]


def test_retry_failed_makes_a_failed_job_succeed_once(jobs: Jobs, kubelet: Kubelet, s3_bucket,
                                                      tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    # Shard 1's first batch crashes attempts 0 and 1 (no quarantine): shard and job fail.
    crash = "cuda_error:batch=0,shard=1,attempt=0;cuda_error:batch=0,shard=1,attempt=1"
    jobs.create("rf", job_spec(s3_bucket, uri, "rf/", failpoints=crash,
                               retry={"quarantine": False}))
    failed = jobs.wait_phase("rf", "Failed", timeout=240)["status"]
    assert failed["shardsFailed"] == "1" and failed["shardsDone"] == "0"
    annotate(jobs, "rf", ANN_RETRY_FAILED, "2026-12-02T10:00")
    wait_for(lambda: requests(jobs, "rf").get("retryFailed") == "2026-12-02T10:00", timeout=60)
    job = jobs.wait_phase("rf", "Succeeded", timeout=240)
    assert job["status"]["requests"]["retryFailed"] == "2026-12-02T10:00"
    retried = events(jobs, "rf", "RetryFailed")
    assert len(retried) == 1 and retried[0]["type"] == "Normal"
    assert "shard(s) 1" in retried[0]["message"] and "1 done shard(s) kept" in retried[0]["message"]
    ran = [key.split("/", 1)[1] for key in kubelet.procs if key.startswith(f"{jobs.namespace}/rf-")]
    assert "rf-1-2" in ran and not any(n.startswith("rf-0-") and n != "rf-0-0" for n in ran)
    assert kubelet.started("rf-1-2", jobs.namespace).proc.returncode == 0  # type: ignore[union-attr]
    assert_output(s3_bucket, "rf/", tmp_path / "in.fa", tmp_path)
    # On a job that has not failed: a one-line Warning, remembered, the job untouched.
    annotate(jobs, "rf", ANN_RETRY_FAILED, "again")
    ignored = wait_for(lambda: events(jobs, "rf", "RetryFailedIgnored"), timeout=60)
    assert ignored[0]["type"] == "Warning" and "Succeeded, not Failed" in ignored[0]["message"]
    assert wait_for(lambda: requests(jobs, "rf").get("retryFailed") == "again", timeout=30)
    assert jobs.get("rf")["status"]["phase"] == "Succeeded"
    assert len(events(jobs, "rf", "RetryFailed")) == 1


def test_damaged_shard_is_embedded_again_then_restart_starts_over(
        jobs: Jobs, kubelet: Kubelet, s3_bucket, tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    store = open_store(s3_bucket.uri("dm/"), s3_bucket.storage)
    # Shard 1 waits 25 s: shard 0 is published first, and damaged before the finalize step.
    spec = job_spec(s3_bucket, uri, "dm/", failpoints="stall:batch=0,shard=1,attempt=0,seconds=25")
    jobs.create("dm", spec)
    wait_for(lambda: store.exists(layout.shard_done(0)), timeout=180)
    assert not store.exists(layout.shard_done(1))
    data = bytearray(store.read_bytes(layout.shard_output(0)))
    data[-1] ^= 0xFF  # one bit-flipped byte: same size, only a re-hash sees it
    store.write_bytes(layout.shard_output(0), bytes(data))
    job = jobs.wait_phase("dm", "Succeeded", timeout=240)
    reset = events(jobs, "dm", "ShardsReset")
    assert len(reset) == 1 and "shard(s) 0" in reset[0]["message"]
    assert job["status"]["requests"]["finalizeFrom"] == 1
    assert "dm-finalize-1" in jobs.pod_names("dm")  # the re-embedding's pod: recorded, gone
    assert kubelet.started("dm-0-1", jobs.namespace).proc.returncode == 0  # type: ignore[union-attr]
    assert_output(s3_bucket, "dm/", tmp_path / "in.fa", tmp_path)

    # Restart: every pod stops, the index step deletes the earlier output (only the job's
    # own layout), and all runs again.
    leftover = layout.part_key(0, layout.part_name(9, 0))
    store.write_bytes(leftover, b"from an earlier run")
    store.write_bytes("notes.txt", b"not the job's")
    annotate(jobs, "dm", ANN_RESTART, "r1")
    wait_for(lambda: requests(jobs, "dm").get("restart") == "r1", timeout=60)
    job = jobs.wait_phase("dm", "Succeeded", timeout=300)
    restart = events(jobs, "dm", "Restart")
    assert len(restart) == 1 and "r1" in restart[0]["message"]
    assert len(events(jobs, "dm", "Succeeded")) == 2  # the new run's phases are posted too
    assert job["status"]["requests"]["restart"] == "r1"
    assert "restarting" not in job["status"]["requests"]
    # The new run's attempts continue past the earlier run's: no pod name repeats.
    # (Worker pods are deleted once recorded: what ran is the kubelet's record.)
    assert set(jobs.pod_names("dm")) <= {"dm-0-2", "dm-1-2", "dm-finalize-2", "dm-index-2"}
    assert {"dm-finalize-2", "dm-index-2"} <= set(jobs.pod_names("dm"))
    for name in ("dm-0-2", "dm-1-2"):
        assert kubelet.started(name, jobs.namespace).proc.returncode == 0  # type: ignore[union-attr]
    assert "restart: deleted" in kubelet.log("dm-index-2", jobs.namespace)
    assert not store.exists(leftover) and store.exists("notes.txt")
    assert_output(s3_bucket, "dm/", tmp_path / "in.fa", tmp_path / "again")
