"""Pod -> Failure classification, table-driven."""

from __future__ import annotations

from datetime import timedelta

import pytest
from operator_helpers import T0, job, with_state

from embedjob.failures import FailureType, TerminationMessage
from embedjob.operator import classify as cls
from embedjob.operator.config import OperatorSettings
from embedjob.operator.pods import build_pod
from embedjob.operator.views import ShardProgress
from embedjob.policy import ShardHistory

F = FailureType
MANIFEST = build_pod(job(), "worker", 0, 0, ShardHistory(), OperatorSettings())


def msg(type_: str, **kw) -> str:
    return TerminationMessage(type=type_, message="m", **kw).to_json()


ROWS = [
    ("oomkilled", dict(exit_code=137, reason="OOMKilled"), F.host_oom),
    ("sigterm message", dict(exit_code=143, reason="Error", message=msg("preempted")),
     F.preempted),
    ("gpu oom message", dict(exit_code=80, reason="Error", message=msg("gpu_oom")), F.gpu_oom),
    ("cuda by exit code", dict(exit_code=81, reason="Error"), F.cuda_error),
    ("transient storage", dict(exit_code=75, reason="Error"), F.storage_error),
    ("input", dict(exit_code=65, reason="Error", message=msg("input_error")), F.input_error),
    ("evicted no container", dict(pod_reason="Evicted"), F.preempted),
    ("disruption target", dict(exit_code=137, reason="Error", conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]),
     F.preempted),
    ("killed past its grace while deleted", dict(exit_code=137, reason="Error", deleting=0),
     F.preempted),
    ("sigkill not deleted", dict(exit_code=137, reason="Error"), F.host_oom),
    ("log tail as message", dict(exit_code=1, reason="Error", message="Traceback ...\nboom"),
     F.generic),
    ("no exit code", dict(), F.generic),
    # Kubelet admission refusals: the pod never ran on the node it was bound to.
    ("gpu device plugin not ready", dict(pod_reason="UnexpectedAdmissionError", pod_message=(
        "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. "
        "Requested: 1, Available: 0, which is unexpected")), F.node_admission),
    ("out of gpu at admission", dict(pod_reason="OutOfnvidia.com/gpu", pod_message=(
        "Node didn't have enough resource: nvidia.com/gpu, requested: 1, used: 0, capacity: 0"
    )), F.node_admission),
    ("out of cpu at admission", dict(pod_reason="OutOfcpu"), F.node_admission),
    ("node affinity at admission", dict(pod_reason="NodeAffinity", pod_message=(
        "Pod Predicate NodeAffinity failed")), F.node_admission),
    # Evicted for disk: its own limit, the cache's sizeLimit, the node's disk. The worker got
    # SIGTERM and says "preempted": the pod's reason must win over its message.
    ("evicted over its ephemeral limit", dict(pod_reason="Evicted", exit_code=143,
     reason="Error", message=msg("preempted"), pod_message=(
         'Pod ephemeral local storage usage exceeds the total limit of containers 20Gi. ')),
     F.disk),
    ("evicted: container over its limit", dict(pod_reason="Evicted", pod_message=(
        'Container worker exceeded its local ephemeral storage limit "20Gi". ')), F.disk),
    ("evicted: cache emptyDir full", dict(pod_reason="Evicted", pod_message=(
        'Usage of EmptyDir volume "cache" exceeds the limit "16Gi". ')), F.disk),
    ("evicted: node disk pressure", dict(pod_reason="Evicted", pod_message=(
        "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, "
        "available: 1Gi. ")), F.disk),
    ("evicted: node memory pressure", dict(pod_reason="Evicted", pod_message=(
        "The node was low on resource: memory. ")), F.preempted),
]


@pytest.mark.parametrize(("kw", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_classify(kw, expected) -> None:
    pod = with_state(MANIFEST, "Failed", **kw)
    failure = cls.classify(pod)
    assert failure.type == expected
    assert failure.node == "node-a"


def test_transient_flag_survives() -> None:
    pod = with_state(MANIFEST, "Failed", exit_code=75, reason="Error",
                     message=msg("storage_error", transient=True))
    assert cls.classify(pod).transient


def test_unschedulable_after_threshold() -> None:
    cond = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/3 nodes: insufficient nvidia.com/gpu", "lastTransitionTime":
             "2025-01-01T00:00:00Z"}]
    pod = with_state(MANIFEST, "Pending", conditions=cond)
    assert cls.unschedulable(pod, T0 + timedelta(seconds=10), 300) is None
    got = cls.unschedulable(pod, T0 + timedelta(seconds=400), 300)
    assert got is not None and "nvidia.com/gpu" in got.message


def test_node_lost() -> None:
    assert cls.node_lost(with_state(MANIFEST, "Unknown"), T0) is not None
    deleting = with_state(MANIFEST, "Running", deleting=0)
    assert cls.node_lost(deleting, T0 + timedelta(seconds=10)) is None
    assert cls.node_lost(deleting, T0 + timedelta(seconds=400)) is not None


def test_made_progress() -> None:
    pod = with_state(MANIFEST, "Failed", exit_code=143, reason="Error")
    assert not cls.made_progress(pod, None)
    assert cls.made_progress(pod, ShardProgress(shard=0, done=5))


def test_plain_text_message_keeps_its_last_line() -> None:
    """FallbackToLogsOnError: a step that wrote no JSON message still says why it stopped."""
    text = "loading...\nembedjob: error: duplicate id 'a'; ids must be unique\n"
    pod = with_state(MANIFEST, "Failed", exit_code=65, reason="Error", message=text)
    failure = cls.classify(pod)
    assert failure.type is F.input_error
    assert failure.message == "embedjob: error: duplicate id 'a'; ids must be unique"


def test_admission_refusals_through_reconcile_never_fail_the_job() -> None:
    """Five fresh GPU nodes in a row refuse the shard (device plugin not ready): with a
    generic budget of 1 this used to fail the job at the first refusal."""
    from embedjob.operator.reconcile import reconcile
    from embedjob.operator.views import IndexInfo

    settings, index = OperatorSettings(), IndexInfo(shards=1, sequences=10)
    spec = {"shards": 1, "retry": {"generic": 1}}
    status: dict = {"phase": "Running"}
    manifest = build_pod(job(**spec), "worker", 0, 0, ShardHistory(), settings)
    for attempt in range(5):
        refused = with_state(manifest, "Failed", pod_reason="UnexpectedAdmissionError",
                             pod_message="Allocate failed: nvidia.com/gpu unavailable",
                             node=f"gpu-{attempt}")
        plan = reconcile(job(status, **spec), [refused], {}, T0, settings, index)
        assert plan.status is not None and plan.status["phase"] == "Running", plan.status
        assert [e.reason for e in plan.events] == ["RetryNodeAdmission"]
        (manifest,) = plan.pods_to_create
        status = plan.status
    terms = manifest["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][-1]["values"] == [f"gpu-{i}" for i in range(5)]


def test_a_pod_refused_before_it_ran_keeps_one_backoff_origin() -> None:
    """No container finish time (an admission refusal): the attempt ended when the pod
    started, not 'now', or a backoff would move forward on every pass and never expire."""
    from embedjob.operator.observe import ended_from_pod

    pod = with_state(MANIFEST, "Failed", pod_reason="UnexpectedAdmissionError", started=5)
    first = ended_from_pod(pod, None, T0 + timedelta(seconds=60))
    later = ended_from_pod(pod, None, T0 + timedelta(seconds=600))
    assert first.finished == later.finished == T0 + timedelta(seconds=5)
