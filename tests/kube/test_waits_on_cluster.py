"""Every wait has a limit and a voice, on a REAL API server: pods that cannot start (an image
that cannot be pulled, a missing credentials Secret, no node that fits) and an index summary
the operator cannot read each give the job a condition and ONE Warning Event per cause (not
one per pod, not one per kubelet retry), then fail it after a short deadline (operator
settings), saying what to fix. The test kubelet plays the kubelet's side (tests/kube/kubelet.py:
``unreachable.invalid/`` images cannot be pulled; env from a missing Secret cannot be made).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubelet import Kubelet
from operatorkit import (
    Jobs,
    condition,
    job_spec,
    module_jobs,
    upload_fasta,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

IMAGE = "unreachable.invalid/embedjob:1"
SETTINGS = {
    "unschedulableAfterSeconds": 1,
    "waitEventIntervalSeconds": 3600,  # the whole test is one interval: one Event per cause
    "waitDeadlines": {"imagePull": 12, "configError": 8, "unschedulable": 15,
                      "indexUnreadable": 10},
    "security": {"allowedImages": ["unreachable.invalid/*"]},
}


@pytest.fixture(scope="module")
def jobs(control_plane, admin_api, crd_installed, kubelet, tmp_path_factory) -> Iterator[Jobs]:
    yield from module_jobs(control_plane, admin_api, tmp_path_factory.mktemp("operator"),
                           SETTINGS)


def warnings(jobs: Jobs, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in jobs.events(name) if e["reason"] == reason and e["type"] == "Warning"]


def failed_with(jobs: Jobs, name: str, reason: str) -> dict[str, Any]:
    """The job Failed with ``reason``; its one-line message; its pods stopped."""
    job = jobs.wait_phase(name, "Failed", timeout=120)
    failed = condition(job, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", reason), failed
    assert failed["message"] == job["status"]["message"] and "\n" not in failed["message"]
    wait_for(lambda: warnings(jobs, name, "Failed"), timeout=30)
    wait_for(lambda: not [p for p in jobs.pods(name) if p["status"].get("phase") == "Pending"],
             timeout=60)
    return job


def test_pods_that_cannot_start_say_why_once_then_fail(jobs: Jobs, kubelet: Kubelet,
                                                       s3_bucket) -> None:
    """No process ever runs: the image cannot be pulled, the Secret does not exist."""
    jobs.create("pull", job_spec(s3_bucket, s3_bucket.uri("in.fa"), "pull/", image=IMAGE))
    jobs.create("nosecret", job_spec(s3_bucket, s3_bucket.uri("in.fa"), "nosecret/",
                                     storage={"credentialsSecret": "missing-credentials"}))
    waiting = wait_for(lambda: jobs.pod("pull-index-0")["status"]["containerStatuses"][0][
        "state"].get("waiting"), timeout=60)
    assert waiting["reason"] in ("ErrImagePull", "ImagePullBackOff")

    job = failed_with(jobs, "pull", "ImagePullFailed")
    assert job["status"]["message"].startswith(
        f"image {IMAGE} cannot be pulled for 12s: ") and "fix spec.image" in \
        job["status"]["message"]
    cond = condition(job, "PodsWaiting")
    assert (cond["status"], cond["reason"]) == ("True", "ImagePullBackOff")
    assert cond["message"].startswith("1 pod(s) ImagePullBackOff: ") and IMAGE in cond["message"]
    pulls = kubelet.pulls[f"{jobs.namespace}/pull-index-0"][0]
    assert pulls >= 3  # the kubelet tried, backed off and said so several times...
    assert len(warnings(jobs, "pull", "ImagePullBackOff")) == 1  # ...the job once

    job = failed_with(jobs, "nosecret", "ContainerConfigError")
    cond = condition(job, "PodsWaiting")
    assert (cond["status"], cond["reason"]) == ("True", "CreateContainerConfigError")
    assert 'secret "missing-credentials" not found' in cond["message"]
    assert job["status"]["message"].startswith(
        "index cannot start its container for 8s: CreateContainerConfigError: secret "
        '"missing-credentials" not found; create the Secret')
    (event,) = warnings(jobs, "nosecret", "CreateContainerConfigError")
    assert 'secret "missing-credentials" not found' in event["message"]


def test_unreadable_index_and_unschedulable_workers_say_why_once_then_fail(
        jobs: Jobs, kubelet: Kubelet, s3_bucket, tmp_path) -> None:
    """The index step writes its summary, but its pod's termination message (where the
    operator takes the shard count from) is lost, and the operator may not read the job's
    output itself (no credentials Secret: security.operatorStorageIdentity jobSecretOnly);
    another job's four workers fit no node."""
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    kubelet.lose_message("noindex-index-0", jobs.namespace)
    ambient = job_spec(s3_bucket, uri, "noindex/", template={"env": [  # as IRSA would
        {"name": "AWS_ACCESS_KEY_ID", "value": "ambient"},
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "ambient"}]})
    del ambient["storage"]["credentialsSecret"]
    jobs.create("noindex", ambient)
    for shard in range(4):
        kubelet.hold(f"crowd-{shard}-0", jobs.namespace)
    jobs.create("crowd", job_spec(s3_bucket, uri, "crowd/", shards=4))

    job = failed_with(jobs, "noindex", "IndexUnreadable")
    out = f"s3://{s3_bucket.bucket}/noindex/"
    assert job["status"]["message"].startswith(
        f"cannot read the index summary: the index pod reported none, and the operator does "
        f"not read {out}: the job names no spec.storage.credentialsSecret")
    assert "for 10s after the index step finished" in job["status"]["message"]
    cond = condition(job, "IndexUnreadable")
    assert cond["status"] == "True" and cond["message"].startswith("cannot read the index")
    assert len(warnings(jobs, "noindex", "IndexUnreadable")) == 1
    assert len(warnings(jobs, "noindex", "StorageNotRead")) == 1
    assert jobs.pod("noindex-index-0")["status"]["phase"] == "Succeeded"  # the summary exists

    job = failed_with(jobs, "crowd", "Unschedulable")
    assert job["status"]["message"].startswith("4 pod(s) unschedulable for 15s: 0/2 nodes")
    cond = condition(job, "PodsWaiting")
    assert (cond["status"], cond["reason"]) == ("True", "Unschedulable")
    assert cond["message"].endswith("(shards 0-3)")
    (event,) = warnings(jobs, "crowd", "Unschedulable")  # one for four pods
    assert event["message"].startswith("4 pod(s) Unschedulable: ")
    assert "Insufficient nvidia.com/gpu" in event["message"]
