"""A job's lifecycle on a REAL API server: invalid spec, deletion with the garbage collector,
an unschedulable pod, a stuck pod. Real workers and moto's S3, as in test_kube_scenarios."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubelet import Kubelet
from operatorkit import (
    Jobs,
    assert_output,
    condition,
    job_spec,
    module_jobs,
    upload_fasta,
    wait_for,
)

from embedjob.spec import API_GROUP

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def jobs(control_plane, admin_api, crd_installed, kubelet, tmp_path_factory) -> Iterator[Jobs]:
    yield from module_jobs(control_plane, admin_api, tmp_path_factory.mktemp("operator"),
                           {"unschedulableAfterSeconds": 1})


def test_invalid_spec_fails_with_condition_and_no_pods(jobs: Jobs, s3_bucket) -> None:
    """The CRD accepts any template (preserve-unknown-fields); the operator refuses it."""
    spec = job_spec(s3_bucket, s3_bucket.uri("in.fa"), "bad/", template={"hostNetwork": True})
    jobs.create("bad", spec)
    job = jobs.wait_phase("bad", "Failed", timeout=60)
    failed = condition(job, "Failed")
    assert failed["reason"] == "InvalidSpec" and "hostNetwork" in failed["message"]
    assert "InvalidSpec" in jobs.reasons("bad")
    assert jobs.pods("bad") == []


@pytest.mark.parametrize("propagation", ["Background", "Foreground"])
def test_deleting_a_running_job_removes_its_pods(jobs: Jobs, kubelet: Kubelet, s3_bucket,
                                                 tmp_path, propagation: str) -> None:
    """The garbage collector deletes the pods (gracefully: the kubelet stops the worker),
    and the operator's finalizer lets the job go."""
    name = f"del-{propagation.lower()}"
    uri = upload_fasta(s3_bucket, tmp_path, 6)
    jobs.create(name, job_spec(s3_bucket, uri, f"{name}/", shards=1,
                               failpoints="stall:batch=0,seconds=300"))
    worker = f"{name}-0-0"
    wait_for(lambda: kubelet.started(worker, jobs.namespace), timeout=180)
    finalizers = jobs.get(name)["metadata"].get("finalizers") or []
    assert f"{API_GROUP}/finalizer" in finalizers
    jobs.delete(name, propagation=propagation)
    wait_for(lambda: jobs.gone(name), timeout=120)
    wait_for(lambda: jobs.pods(name) == [], timeout=120)
    run = kubelet.started(worker, jobs.namespace)
    assert run is not None and run.proc.poll() is not None  # stopped, not left running


def test_unschedulable_pod_waits_then_runs(jobs: Jobs, kubelet: Kubelet, s3_bucket,
                                           tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 6)
    kubelet.hold("un-0-0", jobs.namespace)
    jobs.create("un", job_spec(s3_bucket, uri, "un/", shards=1))

    def unschedulable() -> dict[str, Any] | None:
        job = jobs.get("un")
        return job if condition(job, "Unschedulable").get("status") == "True" else None

    job = wait_for(unschedulable, timeout=180)
    assert "un-0-0" in condition(job, "Unschedulable")["message"]
    assert job["status"]["phase"] == "Running"
    waiting = [e["message"] for e in jobs.events("un") if e["reason"] == "Unschedulable"]
    assert waiting and "Insufficient nvidia.com/gpu" in waiting[0]
    kubelet.release("un-0-0", jobs.namespace)
    job = jobs.wait_phase("un", "Succeeded")
    assert condition(job, "Unschedulable")["status"] == "False"
    assert kubelet.started("un-0-1", jobs.namespace) is None  # not replaced
    assert_output(s3_bucket, "un/", tmp_path / "in.fa", tmp_path)


def test_stuck_pod_is_replaced(jobs: Jobs, kubelet: Kubelet, s3_bucket, tmp_path) -> None:
    assert jobs.operator is not None
    jobs.operator.stop()
    jobs.operator.settings = {**jobs.operator.settings, "stuckAfterSeconds": 20}
    jobs.operator.start()
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    spec = job_spec(s3_bucket, uri, "st/", shards=1,
                    failpoints="stall:batch=1,attempt=0,seconds=600",
                    checkpoint={"everySeconds": 0.5})
    jobs.create("st", spec)
    jobs.wait_phase("st", "Succeeded", timeout=240)
    events = [e for e in jobs.events("st") if e["reason"] == "RetryStuck"]
    assert events and "no heartbeat" in events[0]["message"]
    assert kubelet.started("st-0-1", jobs.namespace) is not None
    # The stuck pod is deleted: stopped (SIGTERM, then SIGKILL after the grace) and gone.
    wait_for(lambda: "st-0-0" not in jobs.pod_names("st"), timeout=60)
    first = kubelet.started("st-0-0", jobs.namespace)
    assert first is not None and first.proc.poll() is not None
    assert_output(s3_bucket, "st/", tmp_path / "in.fa", tmp_path)


def test_operator_reads_secrets_only_by_name(control_plane, jobs: Jobs) -> None:
    """The chart's RBAC is least privilege: the operator may get the Secret a job names (its
    storage identity) but never list or watch Secrets."""
    account = f"system:serviceaccount:{jobs.namespace}:embedjob"
    for verb, answer in (("get", "yes"), ("list", "no"), ("watch", "no")):
        done = control_plane.kubectl("auth", "can-i", verb, "secrets", "-n", jobs.namespace,
                                     "--as", account, check=False)
        assert done.stdout.strip() == answer, verb
    done = control_plane.kubectl("auth", "can-i", "create", "pods", "-n", jobs.namespace,
                                 "--as", account, check=False)
    assert done.stdout.strip() == "yes"
