"""Every wait has a limit and a voice: the pure aggregation and deadline decisions
(embedjob/operator/waits.py through reconcile), and the shell's index read on a real store."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

from operator_helpers import T0, job, ts

from embedjob import layout
from embedjob.operator.config import OperatorSettings, WaitDeadlines
from embedjob.operator.pods import CONTAINER, build_pod
from embedjob.operator.reconcile import reconcile
from embedjob.operator.storage_access import StorageRefused, Stores, job_storage
from embedjob.operator.storage_reads import read_index_summary
from embedjob.operator.views import IndexInfo, IndexUnreadable, PodView, pod_view
from embedjob.operator.waits import pod_wait
from embedjob.policy import ShardHistory

S = OperatorSettings()
IDX = IndexInfo(shards=8, sequences=80)
RUNNING = {"phase": "Running", "shardCount": 8}
PULL = 'Back-off pulling image "unreachable.invalid/embedjob:1"'


def pod(role: str, shard: int = -1, status: dict[str, Any] | None = None,
        started: float = 0, image: str | None = None) -> PodView:
    body = copy.deepcopy(build_pod(job(), role, shard, 0, ShardHistory(), S))
    body["metadata"]["creationTimestamp"] = ts(started)
    if image:
        body["spec"]["containers"][0]["image"] = image
    body["status"] = {"phase": "Pending", "startTime": ts(started), **(status or {})}
    view = pod_view(body)
    assert view is not None
    return view


def waiting(shard: int, reason: str = "ImagePullBackOff", message: str = PULL,
            role: str = "worker", **kw: Any) -> PodView:
    state = {"waiting": {"reason": reason, "message": message}}
    return pod(role, shard, {"containerStatuses": [
        {"name": "sidecar", "state": {"running": {}}},  # not ours: the worker's is read
        {"name": CONTAINER, "state": state}]}, **kw)


def unschedulable(shard: int, since: float = 0) -> PodView:
    return pod("worker", shard, {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
        "lastTransitionTime": ts(since)}]}, started=since)


def index_done(finished: float = 0) -> PodView:
    body = copy.deepcopy(build_pod(job(), "index", -1, 0, ShardHistory(), S))
    body["metadata"]["creationTimestamp"] = ts(finished - 5)
    body["status"] = {"phase": "Succeeded", "containerStatuses": [{"name": CONTAINER, "state": {
        "terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": ts(finished)}}}]}
    view = pod_view(body)
    assert view is not None
    return view


def conditions(plan) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in plan.status["conditions"]}


def test_pod_view_reads_the_workers_waiting_state_and_image() -> None:
    view = waiting(3, "ErrImagePull", "rpc error: not found")
    assert (view.waiting_reason, view.waiting_message) == ("ErrImagePull", "rpc error: not found")
    assert view.image == S.worker_image
    assert pod("worker", 1).waiting_reason is None
    wait = pod_wait(waiting(3, "ContainerCreating", ""), T0)
    assert wait is None  # a pod starting is not waiting


def test_many_waiting_pods_make_one_condition_and_one_event_per_cause() -> None:
    pods = [index_done(), *(waiting(s, "ErrImagePull" if s % 2 else "ImagePullBackOff")
                           for s in range(5)), unschedulable(6), unschedulable(7)]
    quick = OperatorSettings(unschedulableAfterSeconds=60, waitEventIntervalSeconds=100)
    plan = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=150), quick, IDX)
    cond = conditions(plan)["PodsWaiting"]
    assert (cond["status"], cond["reason"]) == ("True", "ImagePullBackOff")
    assert cond["message"].startswith("5 pod(s) ImagePullBackOff: ") and "(shards 0-4)" in \
        cond["message"] and "2 pod(s) Unschedulable: " in cond["message"]
    assert "(shards 6-7)" in cond["message"]
    warnings = [e for e in plan.events if e.type == "Warning"]
    assert sorted(e.reason for e in warnings) == ["ImagePullBackOff", "Unschedulable"]
    assert plan.status["phase"] == "Running" and plan.status_urgent
    # The same interval: the same keys (the shell posts each once, a restart at most once).
    later = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=190), quick, IDX)
    assert {e.key for e in later.events} == {e.key for e in warnings}
    # The next interval: new keys, still one per cause.
    next_one = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=210), quick, IDX)
    keys = {e.key for e in next_one.events}
    assert len(keys) == 2 and not keys & {e.key for e in warnings}


def test_an_unschedulable_group_is_said_whole_once_its_oldest_pod_waited_long_enough() -> None:
    """Four pods of one chunk, judged by the scheduler 0-3 s apart: one Event for all four
    once the first has waited unschedulableAfterSeconds, none before."""
    pods = [index_done(), *(unschedulable(s, since=s) for s in range(4))]
    quick = OperatorSettings(unschedulableAfterSeconds=15)
    early = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=14), quick, IDX)
    assert not [e for e in early.events if e.reason == "Unschedulable"]
    plan = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=15), quick, IDX)
    (event,) = [e for e in plan.events if e.reason == "Unschedulable"]
    assert event.message.startswith("4 pod(s) Unschedulable: ") and "(shards 0-3)" in \
        event.message


def test_nothing_waits_clears_the_condition() -> None:
    old = {**RUNNING, "conditions": [{"type": "PodsWaiting", "status": "True",
                                      "reason": "Unschedulable", "message": "x",
                                      "lastTransitionTime": ts(0)}]}
    running = pod("worker", 0, {"phase": "Running"})
    plan = reconcile(job(old), [index_done(), running], {}, T0 + timedelta(seconds=60), S, IDX)
    cond = conditions(plan)["PodsWaiting"]
    assert (cond["status"], cond["reason"], cond["lastTransitionTime"]) == (
        "False", "NoneWaiting", ts(60))
    assert "IndexUnreadable" not in conditions(plan)  # never True: not there at all
    assert not [e for e in plan.events if e.type == "Warning"]


def test_image_pull_fails_the_job_after_its_deadline_and_stops_its_pods() -> None:
    image = "unreachable.invalid/embedjob:1"
    pods = [index_done(), waiting(0, image=image), waiting(1, image=image, started=100),
            pod("worker", 2, {"phase": "Running"})]
    before = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=590), S, IDX)
    assert before.status["phase"] == "Running"
    assert before.requeue_after is not None and before.requeue_after <= 10
    plan = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=600), S, IDX)
    assert plan.status["phase"] == "Failed" and plan.pods_to_create == []
    failed = conditions(plan)["Failed"]
    assert failed["reason"] == "ImagePullFailed"
    assert failed["message"].startswith(f"image {image} cannot be pulled for 600s: "
                                        f"ImagePullBackOff: {PULL}; fix spec.image")
    assert plan.status["message"] == failed["message"]
    assert sorted(plan.pods_to_delete) == sorted(p.name for p in pods[1:])
    assert [e.message for e in plan.events if e.reason == "Failed"] == [failed["message"]]


def test_invalid_image_fails_at_once_and_unschedulable_waits_forever_by_default() -> None:
    bad = waiting(-1, "InvalidImageName", 'couldn\'t parse image reference "Bad Image"',
                  role="index", image="Bad Image")
    plan = reconcile(job(), [bad], {}, T0 + timedelta(seconds=1), S)
    assert plan.status["phase"] == "Failed"
    assert conditions(plan)["Failed"]["reason"] == "InvalidImageName"
    assert "image Bad Image is not a valid image name: InvalidImageName" in \
        plan.status["message"]
    day = T0 + timedelta(days=1)
    assert reconcile(job(RUNNING), [index_done(), unschedulable(0)], {}, day, S,
                     IDX).status["phase"] == "Running"
    strict = OperatorSettings(wait_deadlines=WaitDeadlines(unschedulable=3600))
    plan = reconcile(job(RUNNING), [index_done(), unschedulable(0)], {}, day, strict, IDX)
    assert plan.status["phase"] == "Failed"
    assert plan.status["message"].startswith("1 pod(s) unschedulable for 3600s: 0/2 nodes")


def test_a_missing_secret_fails_after_the_config_deadline() -> None:
    pods = [waiting(-1, "CreateContainerConfigError", 'secret "s3-creds" not found',
                    role="index")]
    soon = reconcile(job(), pods, {}, T0 + timedelta(seconds=10), S)
    cond = conditions(soon)["PodsWaiting"]
    assert cond["reason"] == "CreateContainerConfigError"
    assert cond["message"] == ('1 pod(s) CreateContainerConfigError: CreateContainerConfigError: '
                               'secret "s3-creds" not found (index)')
    assert [e.reason for e in soon.events if e.type == "Warning"] == [
        "CreateContainerConfigError"]
    plan = reconcile(job(), pods, {}, T0 + timedelta(seconds=300), S)
    assert plan.status["phase"] == "Failed"
    assert conditions(plan)["Failed"]["reason"] == "ContainerConfigError"
    assert plan.status["message"].startswith(
        'index cannot start its container for 300s: CreateContainerConfigError: secret '
        '"s3-creds" not found; create the Secret')


def test_an_unreadable_index_is_said_then_fails_from_the_index_pods_finish() -> None:
    error = IndexUnreadable("cannot read s3://b/out/index/summary.json: access denied (403)")
    plan = reconcile(job(RUNNING), [index_done(finished=0)], {}, T0 + timedelta(seconds=30), S,
                     error)
    cond = conditions(plan)["IndexUnreadable"]
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "True", "IndexUnreadable", error.message)
    assert [e.reason for e in plan.events if e.type == "Warning"] == ["IndexUnreadable"]
    assert plan.status["phase"] == "Running" and plan.status_urgent
    plan = reconcile(job(RUNNING), [index_done(finished=0)], {}, T0 + timedelta(seconds=600), S,
                     error)
    assert plan.status["phase"] == "Failed"
    assert conditions(plan)["Failed"]["reason"] == "IndexUnreadable"
    assert plan.status["message"].startswith(f"{error.message}, for 600s after the index step")
    # The index pod gone (deleted, or a restart with no pods): counted from the condition.
    old = {**RUNNING, "conditions": [dict(cond, lastTransitionTime=ts(100))]}
    assert reconcile(job(old), [], {}, T0 + timedelta(seconds=650), S,
                     error).status["phase"] == "Running"
    assert reconcile(job(old), [], {}, T0 + timedelta(seconds=700), S,
                     error).status["phase"] == "Failed"


def test_the_shell_reads_the_index_or_says_why_not(tmp_path: Path) -> None:
    view = job(output={"uri": str(tmp_path)})
    settings = OperatorSettings()
    stores, where = Stores(settings, lambda *_: {}), job_storage(
        view.namespace, view.name, view.spec, settings)

    def read() -> IndexInfo | IndexUnreadable | StorageRefused:
        return read_index_summary(stores, view.uid, where)

    missing = read()
    assert isinstance(missing, IndexUnreadable)
    # The URI as the job wrote it (a path here), not as the store normalises it.
    assert missing.message.startswith(f"cannot read {tmp_path}/{layout.SUMMARY}: ")
    (tmp_path / "index").mkdir()
    (tmp_path / layout.SUMMARY).write_text("<html>proxy error</html>")
    garbage = read()
    assert isinstance(garbage, IndexUnreadable) and "not an index summary" in garbage.message
    (tmp_path / layout.SUMMARY).write_text('{"shards": 4, "sequences": 40}')
    assert read() == IndexInfo(shards=4, sequences=40)
