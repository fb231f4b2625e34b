"""What the operator removes: recorded worker pods, finished jobs after their TTL. Pure."""

from __future__ import annotations

from datetime import timedelta

from operator_helpers import T0, job, ts, with_state

from embedjob.operator.config import OperatorSettings
from embedjob.operator.observe import ended_attempts
from embedjob.operator.pods import build_pod
from embedjob.operator.reconcile import reconcile
from embedjob.operator.retention import recorded_pods, ttl_left
from embedjob.operator.views import IndexInfo
from embedjob.policy import ShardHistory

S = OperatorSettings()
IDX = IndexInfo(shards=3, sequences=30)


def pod(role: str, shard: int, phase: str, **kw):
    return with_state(build_pod(job(), role, shard, 0, ShardHistory(), S), phase, **kw)


def test_only_succeeded_workers_the_written_status_counts_are_deleted() -> None:
    pods = [pod("worker", 0, "Succeeded"), pod("worker", 1, "Succeeded"),
            pod("worker", 2, "Running"), pod("index", -1, "Succeeded"),
            pod("worker", 3, "Succeeded", deleting=5)]
    written = job({"phase": "Running", "shardsDone": "0,2-3"}).status
    # Shard 1 is done only in a status not written yet: its pod is the only record.
    assert recorded_pods(pods, written) == ["j-0-0"]
    assert recorded_pods(pods, job({"phase": "Running"}).status) == []


def test_a_deleted_recorded_pod_is_not_a_vanished_attempt() -> None:
    running = job({"phase": "Running"})
    first = reconcile(running, [pod("worker", s, "Running") for s in range(3)], {}, T0, S, IDX)
    status = first.status | {"shardsDone": "0-1", "shardsRunning": "2",
                             "shardAttempts": {"0": "2"}}
    after = job(status)
    pods = [pod("worker", 2, "Running")]  # 0 and 1 recorded, their pods deleted
    plan = reconcile(after, pods, {}, T0 + timedelta(seconds=5), S, IDX)
    assert plan.pods_to_create == [] and plan.pods_to_delete == []
    assert [e.reason for e in plan.events] == []
    assert plan.status["shardsDone"] == "0-1" and ended_attempts(after, pods) == {}


def finished(phase: str, condition: str, ttl: int | None = 60):
    cond = {"type": condition, "status": "True", "reason": phase, "lastTransitionTime": ts(0)}
    spec = {"ttlSecondsAfterFinished": ttl} if ttl is not None else {}
    return job({"phase": phase, "conditions": [cond]}, **spec)


def test_ttl_counts_from_the_finishing_transition() -> None:
    done = finished("Succeeded", "Complete")
    assert ttl_left(done, done.status, T0 + timedelta(seconds=20)) == 40
    assert ttl_left(done, done.status, T0 + timedelta(seconds=61)) == -1
    failed = finished("Failed", "Failed", ttl=0)
    assert ttl_left(failed, failed.status, T0) == 0


def test_no_ttl_while_running_or_unset() -> None:
    done = finished("Succeeded", "Complete", ttl=None)
    assert ttl_left(done, done.status, T0 + timedelta(days=9)) is None
    live = job({"phase": "Running"}, ttlSecondsAfterFinished=0)
    assert ttl_left(live, live.status, T0) is None
    # The transition not written yet: the clock has not started.
    pending = finished("Succeeded", "Complete", ttl=0)
    assert ttl_left(pending, live.status, T0) is None
