"""Requests on a job (embedjob.io/restart, embedjob.io/retry-failed, shards a finalize step
reset), decided by the pure reconcile: each acted on once, each visible as an Event and in
status.requests."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from operator_helpers import T0, job_body, with_state

from embedjob.failures import TerminationMessage
from embedjob.operator.config import OperatorSettings
from embedjob.operator.names import ANN_RESTART, ANN_RETRY_FAILED, RESTART_ENV
from embedjob.operator.pods import build_pod
from embedjob.operator.reconcile import Plan, reconcile
from embedjob.operator.requests import MAX_FINALIZE_RESETS
from embedjob.operator.views import IndexInfo, JobView, PodView, job_view
from embedjob.policy import ShardHistory

S = OperatorSettings()
IDX = IndexInfo(shards=3, sequences=30)
CUDA_TWICE = ShardHistory(attempts=2, failures={"cuda_error": 1, "poison_input": 1},
                          avoid_nodes=("node-a",), max_tokens=1024)


def job(status: dict[str, Any] | None = None, **annotations: str) -> JobView:
    body = job_body(status)
    body["metadata"]["annotations"] = {
        {"restart": ANN_RESTART, "retry": ANN_RETRY_FAILED}[k]: v for k, v in annotations.items()}
    return job_view(body)


FRESH = ShardHistory()


def pod(role: str, shard: int, attempt: int, phase: str, history: ShardHistory = FRESH,
        message: str | None = None, code: int | None = None) -> PodView:
    manifest = build_pod(job(), role, shard, attempt, history, S)
    if phase == "Succeeded":
        return with_state(manifest, phase, exit_code=0, reason="Completed")
    if phase == "Failed":
        return with_state(manifest, phase, exit_code=code, reason="Error", message=message)
    return with_state(manifest, phase)


def names(plan: Plan) -> list[str]:
    return sorted(p["metadata"]["name"] for p in plan.pods_to_create)


def env(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in manifest["spec"]["containers"][0]["env"]}


def failed_job() -> tuple[dict[str, Any], list[PodView]]:
    """Shard 1 failed for good (a batch crashed twice), shard 0 done, shard 2 stopped."""
    crash = TerminationMessage("cuda_error", "batch 0 crashed the model").to_json()
    pods = [pod("index", -1, 0, "Succeeded"), pod("worker", 0, 0, "Succeeded"),
            pod("worker", 1, 1, "Failed", CUDA_TWICE, crash, 81), pod("worker", 2, 0, "Running")]
    plan = reconcile(job({"phase": "Running"}), pods, {}, T0, S, IDX)
    assert plan.status["phase"] == "Failed" and plan.pods_to_delete == ["j-2-0"]
    return plan.status, pods[:3]  # shard 2's pod is gone once stopped


def test_retry_failed_reruns_failed_shards_once_with_a_fresh_budget() -> None:
    status, pods = failed_job()
    plan = reconcile(job(status, retry="t1"), pods, {}, T0, S, IDX)
    assert names(plan) == ["j-1-2", "j-2-1"]  # no "disappeared" retry for the stopped one
    assert plan.status["phase"] == "Running" and plan.status["shardsFailed"] == ""
    assert plan.status["shardsDone"] == "0" and plan.status["requests"]["retryFailed"] == "t1"
    assert "shard(s) 1" in plan.status["requests"]["last"]
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "RetryFailed")]
    retry = next(p for p in plan.pods_to_create if p["metadata"]["name"] == "j-1-2")
    history = ShardHistory.from_json(retry["metadata"]["annotations"]["embedjob.io/history"])
    # As `embedjob run --retry-failed`: failures forgotten, what was learnt kept.
    assert not history.failures and history.max_tokens == 1024
    assert history.avoid_nodes == ("node-a",)
    assert "j-1-1" in plan.pods_to_delete  # the failed attempt is history now
    # The same value again (a re-reconcile, a restarted operator): nothing repeated.
    created = [with_state(m, "Pending") for m in plan.pods_to_create]
    again = reconcile(job(plan.status, retry="t1"), [*pods, *created], {}, T0, S, IDX)
    assert names(again) == [] and not [e for e in again.events if e.reason.startswith("Retry")]
    # Both succeed: the job finalizes and succeeds; the failed pod counts no more.
    ok = [pods[0], pods[1], pod("worker", 1, 2, "Succeeded"), pod("worker", 2, 1, "Succeeded")]
    merging = reconcile(job(again.status, retry="t1"), [*ok, pods[2]], {}, T0, S, IDX)
    assert names(merging) == ["j-finalize-0"] and merging.status["shardsDone"] == "0-2"


def test_retry_failed_on_a_job_that_has_not_failed_is_a_warning() -> None:
    pods = [pod("worker", s, 0, "Running") for s in range(3)]
    plan = reconcile(job({"phase": "Running"}, retry="x"), pods, {}, T0, S, IDX)
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "RetryFailedIgnored")]
    assert "the job is Running, not Failed" in plan.events[0].message
    assert plan.status["phase"] == "Running" and plan.status["requests"]["retryFailed"] == "x"
    assert names(plan) == [] and plan.pods_to_delete == []
    # On a finished job too: the status records it although nothing else changes.
    done = {"phase": "Succeeded", "observedGeneration": 1, "shardsDone": "0-2"}
    finished = reconcile(job(done, retry="y"), [], {}, T0, S, IDX)
    assert finished.status["phase"] == "Succeeded"
    assert finished.events[0].reason == "RetryFailedIgnored"
    assert reconcile(job(finished.status, retry="y"), [], {}, T0, S, IDX).events == []


def test_retry_failed_after_a_failed_finalize_runs_it_again() -> None:
    shards = [pod("worker", s, 0, "Succeeded") for s in range(3)]
    fin = pod("finalize", -1, 0, "Failed", message=TerminationMessage(
        "input_error", "no index").to_json(), code=78)
    failed = reconcile(job({"phase": "Merging"}), [*shards, fin], {}, T0, S, IDX)
    assert failed.status["phase"] == "Failed"
    plan = reconcile(job(failed.status, retry="r"), [*shards, fin], {}, T0, S, IDX)
    assert names(plan) == ["j-finalize-1"] and plan.status["phase"] == "Merging"
    assert plan.events[0].reason == "RetryFailed"


def test_restart_stops_every_pod_then_the_index_step_discards() -> None:
    pods = [pod("index", -1, 0, "Succeeded"), pod("worker", 0, 0, "Succeeded"),
            pod("worker", 1, 0, "Running"), pod("finalize", -1, 0, "Failed")]
    plan = reconcile(job({"phase": "Running", "shardsDone": "0"}, restart="r1"), pods, {}, T0,
                     S, IDX)
    assert sorted(plan.pods_to_delete) == sorted(p.name for p in pods)
    assert plan.pods_to_create == [] and plan.forget_reads and plan.requeue_after
    assert plan.status["phase"] == "Pending" and plan.status["shardsDone"] == ""
    assert plan.status["requests"] == {"restart": "r1", "restarting": True, "attemptBase": 1,
                                       "finalizeFrom": 1, "last": plan.status["requests"]["last"]}
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "Restart")]
    # Still one pod stopping: wait, and create nothing (no late writer beside the discard).
    stopping = [pods[2]]
    wait = reconcile(job(plan.status, restart="r1"), stopping, {}, T0, S, IDX)
    assert wait.pods_to_create == [] and "waiting for 1 pod" in wait.status["message"]
    assert wait.events == []
    # All gone: a new index pod that discards the output first; attempts continue past the
    # earlier run's, so no pod name (nor its Events, nor its logs) repeats.
    start = reconcile(job(wait.status, restart="r1"), [], {}, T0, S, None)
    assert names(start) == ["j-index-1"] and start.status["phase"] == "Indexing"
    assert env(start.pods_to_create[0])[RESTART_ENV] == "r1"
    assert start.status["requests"]["restart"] == "r1"
    assert "restarting" not in start.status["requests"]
    # Acted on once: the same value later changes nothing.
    index = with_state(start.pods_to_create[0], "Succeeded", exit_code=0, reason="Completed")
    later = reconcile(job(start.status, restart="r1"), [index], {}, T0, S, IDX)
    assert names(later) == ["j-0-1", "j-1-1", "j-2-1"] and not later.pods_to_delete
    shard = with_state(later.pods_to_create[0], "Succeeded", exit_code=0, reason="Completed")
    old = pod("worker", 0, 0, "Succeeded")  # a pod of the earlier run would be history
    assert reconcile(job(later.status, restart="r1"), [index, shard, old], {}, T0, S,
                     IDX).status["shardsDone"] == "0"


def test_finalize_that_reset_shards_reruns_them_then_finalizes_again() -> None:
    shards = [pod("worker", s, 0, "Succeeded") for s in range(3)]
    said = TerminationMessage("storage_error", "1 finished shards are damaged (shard 1: …)",
                              reset_shards=[1])
    fin = pod("finalize", -1, 0, "Failed", message=said.to_json(), code=74)
    merging = {"phase": "Merging", "shardsDone": "0-2"}
    plan = reconcile(job(merging), [*shards, fin], {}, T0, S, IDX)
    assert names(plan) == ["j-1-1"] and plan.status["phase"] == "Running"
    assert plan.status["shardsDone"] == "0,2"
    event = next(e for e in plan.events if e.reason == "ShardsReset")
    assert event.type == "Normal" and "shard(s) 1" in event.message
    assert plan.status["requests"]["finalizeFrom"] == 1
    assert "j-finalize-0" in plan.pods_to_delete and "j-1-0" in plan.pods_to_delete
    # The old Succeeded pod of shard 1 no longer makes it done; the new one does.
    pending = with_state(plan.pods_to_create[0], "Running")
    again = reconcile(job(plan.status), [*shards, fin, pending], {}, T0, S, IDX)
    assert names(again) == [] and again.status["shardsDone"] == "0,2"
    assert again.status["phase"] == "Running" and not again.events
    rerun = pod("worker", 1, 1, "Succeeded")
    done = reconcile(job(again.status), [*shards, fin, rerun], {}, T0, S, IDX)
    assert names(done) == ["j-finalize-1"] and done.status["phase"] == "Merging"


def test_finalize_resets_are_capped() -> None:
    shards = [pod("worker", s, 0, "Succeeded") for s in range(3)]
    said = TerminationMessage("storage_error", "damaged", reset_shards=[1]).to_json()
    fin = pod("finalize", -1, 3, "Failed", message=said, code=74)
    status = {"phase": "Merging", "shardsDone": "0-2",
              "requests": {"finalizeFrom": 3, "resets": MAX_FINALIZE_RESETS}}
    plan = reconcile(job(status), [*shards, fin], {}, T0 + timedelta(seconds=1), S, IDX)
    assert plan.status["phase"] == "Failed" and "damaged" in plan.status["message"]
    assert names(plan) == []
    # retry-failed then embeds the shard it reset and finalizes after it.
    retry = reconcile(job(plan.status, retry="z"), [*shards, fin], {}, T0, S, IDX)
    assert names(retry) == ["j-1-1"] and retry.status["shardsDone"] == "0,2"
    assert retry.status["requests"]["finalizeFrom"] == 4 and "resets" not in retry.status[
        "requests"]


def test_the_termination_message_carries_reset_shards() -> None:
    text = TerminationMessage("storage_error", "m", reset_shards=[2, 5]).to_json()
    assert json.loads(text)["reset_shards"] == [2, 5]
    assert TerminationMessage.from_json(text).reset_shards == [2, 5]  # type: ignore[union-attr]
    assert "reset_shards" not in TerminationMessage("generic", "m").to_json()


def test_a_phase_reached_again_after_a_request_gets_its_event_again() -> None:
    status, pods = failed_job()
    first = reconcile(job({"phase": "Running"}), [*pods, pod("worker", 2, 0, "Running")], {},
                      T0, S, IDX)
    retried = reconcile(job(status, retry="t"), pods, {}, T0, S, IDX)
    bad = TerminationMessage("input_error", "still broken").to_json()
    again = [*pods, pod("worker", 1, 2, "Failed", message=bad, code=65),
             pod("worker", 2, 1, "Running")]
    failed = reconcile(job(retried.status, retry="t"), again, {}, T0, S, IDX)
    assert failed.status["phase"] == "Failed"
    keys = {e.reason: e.key for e in [*first.events, *failed.events]}
    assert keys["Failed"] != next(e.key for e in first.events if e.reason == "Failed")
