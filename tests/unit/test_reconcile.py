"""The pure reconcile function: observed world in, plan out. Table-driven where it fits."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from operator_helpers import T0, job, with_state

from embedjob.failures import TerminationMessage
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import fold
from embedjob.operator.pods import build_pod
from embedjob.operator.reconcile import MANIFEST_CAP, reconcile
from embedjob.operator.views import IndexInfo, ShardProgress
from embedjob.policy import ShardHistory
from embedjob.progress import HeartbeatRecord
from embedjob.ranges import format_ranges
from embedjob.ranges import range_set as parse_ranges

S = OperatorSettings()
IDX = IndexInfo(shards=3, sequences=30)
FRESH = ShardHistory()


def names(plan) -> list[str]:
    return [p["metadata"]["name"] for p in plan.pods_to_create]


def worker(shard: int, attempt: int = 0, history: ShardHistory = FRESH, **spec):
    return build_pod(job(**spec), "worker", shard, attempt, history, S)


def running(shard: int, attempt: int = 0, **kw):
    return with_state(worker(shard, attempt), "Running", **kw)


def failed(shard: int, attempt: int = 0, history=FRESH, msg=None, code=1, **kw):
    text = TerminationMessage(type=msg, message=f"{msg} happened").to_json() if msg else None
    return with_state(worker(shard, attempt, history), "Failed", exit_code=code, reason="Error",
                      message=text, **kw)


def succeeded(shard: int, attempt: int = 0):
    return with_state(worker(shard, attempt), "Succeeded", exit_code=0, reason="Completed")


RUNNING = {"phase": "Running"}


@pytest.mark.parametrize(
    ("text", "numbers"),
    [("", set()), ("0-3,5", {0, 1, 2, 3, 5}), ("7", {7}), ("0-1,3-4", {0, 1, 3, 4})],
)
def test_ranges(text, numbers) -> None:
    assert parse_ranges(text) == numbers
    assert format_ranges(numbers) == text


def test_new_job_starts_index_pod() -> None:
    plan = reconcile(job(), [], {}, T0, S, IDX)
    assert names(plan) == ["j-index-0"]
    assert plan.status["phase"] == "Indexing"
    assert plan.status_urgent and plan.events[0].reason == "Indexing"


def test_index_done_starts_shards_up_to_parallelism() -> None:
    index = build_pod(job(), "index", -1, 0, ShardHistory(), S)
    done = with_state(index, "Succeeded", exit_code=0, reason="Completed")
    plan = reconcile(job({"phase": "Indexing"}, parallelism=2), [done], {}, T0, S, IDX)
    assert names(plan) == ["j-0-0", "j-1-0"]
    assert plan.status["phase"] == "Running"
    # Fresh attempts have nothing to tell: summarised, not listed.
    assert plan.status["shardAttempts"] == {"0": "0-1"} and plan.status["manifest"] == []


def test_idempotent_when_pods_exist() -> None:
    pods = [running(0), running(1), running(2)]
    plan = reconcile(job(RUNNING), pods, {}, T0, S, IDX)
    assert plan.pods_to_create == [] and plan.pods_to_delete == []


def test_finished_shards_are_ranges_not_entries() -> None:
    pods = [succeeded(0), succeeded(1), running(2)]
    plan = reconcile(job(RUNNING), pods, {}, T0, S, IDX)
    assert plan.status["shardsDone"] == "0-1"
    assert plan.status["shardsRunning"] == "2" and plan.status["shardAttempts"] == {"0": "2"}


FAILURES = [
    # (name, failed pod, expected new pod, event reason, shard state)
    ("preempted -> at once", lambda: failed(1, msg="preempted", code=143), "j-1-1",
     "RetryPreempted", None),
    ("gpu oom -> smaller", lambda: failed(1, msg="gpu_oom", code=80), "j-1-1", "RetryGpuOom",
     None),
    ("input error -> fail", lambda: failed(1, msg="input_error", code=65), None, "ShardFailed",
     "Failed"),
    ("generic -> backoff", lambda: failed(1, msg=None, code=1), None, "RetryGeneric",
     "Backoff"),
    ("oomkilled", lambda: with_state(worker(1), "Failed", exit_code=137, reason="OOMKilled"),
     "j-1-1", "RetryHostOom", None),
]


@pytest.mark.parametrize(("pod", "new", "reason", "state"), [r[1:] for r in FAILURES],
                         ids=[r[0] for r in FAILURES])
def test_failure_decisions(pod, new, reason, state) -> None:
    pods = [running(0), pod(), running(2)]
    plan = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=1), S, IDX)
    assert names(plan) == ([new] if new else [])
    assert [e.reason for e in plan.events] in ([reason], [reason, "Failed"])
    entry = next(e for e in plan.status["manifest"] if e["shard"] == 1)
    if state:
        assert entry["state"] == state
    assert entry["lastFailure"]["type"]


def test_oom_override_reaches_the_new_pod() -> None:
    plan = reconcile(job(RUNNING), [running(0), failed(1, msg="gpu_oom", code=80), running(2)],
                     {}, T0, S, IDX)
    env = {e["name"]: e.get("value") for e in plan.pods_to_create[0]["spec"]["containers"][0]
           ["env"]}
    assert env["EMBEDJOB_MAX_TOKENS_PER_BATCH"] == "8192"


def test_input_error_fails_job_and_stops_others() -> None:
    pods = [running(0), failed(1, msg="input_error", code=65), running(2)]
    plan = reconcile(job(RUNNING), pods, {}, T0, S, IDX)
    assert plan.status["phase"] == "Failed"
    assert set(plan.pods_to_delete) == {"j-0-0", "j-2-0"}
    cond = {c["type"]: c for c in plan.status["conditions"]}
    assert cond["Failed"]["status"] == "True"
    assert "input_error happened" in cond["Failed"]["message"]


def test_cuda_twice_fails() -> None:
    h = ShardHistory(attempts=2, failures={"cuda_error": 1}, avoid_nodes=("node-a",))
    pods = [running(0), failed(1, attempt=1, history=h, msg="cuda_error", code=81), running(2)]
    plan = reconcile(job(RUNNING), pods, {}, T0, S, IDX)
    assert plan.status["phase"] == "Failed"
    assert any(e.reason == "ShardFailed" and "cuda_error" in e.message for e in plan.events)


def test_backoff_then_retry_after_delay() -> None:
    pods = [running(0), failed(1, msg=None, code=1, finished=0), running(2)]
    first = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=1), S, IDX)
    assert names(first) == [] and 0 < first.requeue_after <= 10
    later = reconcile(job(RUNNING), pods, {}, T0 + timedelta(seconds=11), S, IDX)
    assert names(later) == ["j-1-1"]


def test_vanished_pod_is_preempted() -> None:
    status = {"phase": "Running", "manifest": [{"shard": 1, "state": "Running", "attempt": 0,
                                                "pod": "j-1-0"}]}
    plan = reconcile(job(status), [running(0), running(2)], {}, T0, S, IDX)
    assert names(plan) == ["j-1-1"]
    assert plan.events[0].reason == "RetryPreempted"


def test_stuck_pod_replaced_then_deleted() -> None:
    """Stuck from the heartbeat as last read: a beat last seen moving at T0, read again (same
    value) after the threshold."""
    pods = [running(0), running(1, started=0), running(2)]
    prog = {1: ShardProgress(shard=1, done=5, updated=T0)}
    t0 = T0.timestamp()
    record = HeartbeatRecord(attempt=0, stage="embedding", beat=7)
    first = fold(None, 0, record, t0, "s3://b/o/")
    late = fold(first, 0, record, t0 + S.stuck_after_seconds + 1, "s3://b/o/")
    now = T0 + timedelta(seconds=S.stuck_after_seconds + 2)
    plan = reconcile(job(RUNNING), pods, prog, now, S, IDX, {1: late})
    assert "j-1-1" in names(plan) and "j-1-0" in plan.pods_to_delete
    assert plan.events[0].reason == "RetryStuck" and "no heartbeat" in plan.events[0].message
    # Without a recent read (the budget spread reads thin) nothing is concluded; nor from
    # commits alone (progress.json's age is not liveness).
    assert names(reconcile(job(RUNNING), pods, prog, now, S, IDX, {1: first})) == []
    assert names(reconcile(job(RUNNING), pods, prog, now, S, IDX)) == []


def test_suspend_deletes_active_pods_and_resume_restarts() -> None:
    pods = [running(0), succeeded(1), running(2)]
    plan = reconcile(job(RUNNING, suspend=True), pods, {}, T0, S, IDX)
    assert set(plan.pods_to_delete) == {"j-0-0", "j-2-0"}
    assert plan.status["phase"] == "Suspended"
    resumed = reconcile(job(plan.status), [succeeded(1)], {}, T0, S, IDX)
    assert sorted(names(resumed)) == ["j-0-1", "j-2-1"]
    assert not any(e.reason.startswith("Retry") for e in resumed.events)


def test_all_done_runs_finalize_then_succeeds() -> None:
    pods = [succeeded(0), succeeded(1), succeeded(2)]
    plan = reconcile(job(RUNNING), pods, {}, T0, S, IDX)
    assert names(plan) == ["j-finalize-0"] and plan.status["phase"] == "Merging"
    fin = with_state(plan.pods_to_create[0], "Succeeded", exit_code=0, reason="Completed")
    done = reconcile(job(plan.status), [*pods, fin], {}, T0, S, IDX)
    assert done.status["phase"] == "Succeeded"
    assert reconcile(job(done.status), [*pods, fin], {}, T0, S, IDX).status is None


def test_invalid_spec_fails_with_condition() -> None:
    plan = reconcile(job(shards=0), [], {}, T0, S, IDX)
    assert plan.status["phase"] == "Failed"
    cond = {c["type"]: c for c in plan.status["conditions"]}["Failed"]
    assert cond["reason"] == "InvalidSpec" and "shards" in cond["message"]


def test_progress_and_eta() -> None:
    prog = {0: ShardProgress(shard=0, done=50, total=100, rate=5.0, updated=T0),
            1: ShardProgress(shard=1, done=100, total=100, updated=T0),
            2: ShardProgress(shard=2, done=0, total=100, rate=5.0, updated=T0)}
    plan = reconcile(job(RUNNING), [running(0), succeeded(1), running(2)], prog, T0, S,
                     IndexInfo(shards=3, sequences=300))
    p = plan.status["progress"]
    assert p["done"] == 150 and p["total"] == 300 and p["percent"] == 50.0
    assert p["etaSeconds"] == 15


def test_status_stays_small_at_scale() -> None:
    n = 10000
    pods = [succeeded(s) for s in range(n - 50)] + [running(s) for s in range(n - 50, n)]
    plan = reconcile(job(RUNNING, shards=n), pods, {}, T0, S, IndexInfo(n, 10 * n))
    import json
    assert len(json.dumps(plan.status)) < 64 * 1024
    assert plan.status["shardsDone"] == f"0-{n - 51}"


def test_effective_shard_count_comes_from_the_index_summary() -> None:
    index = build_pod(job(), "index", -1, 0, ShardHistory(), S)
    done = with_state(index, "Succeeded", exit_code=0, reason="Completed")
    small = IndexInfo(shards=2, sequences=2)  # fewer sequences than spec.shards (3)
    plan = reconcile(job({"phase": "Indexing"}, parallelism=8), [done], {}, T0, S, small)
    assert names(plan) == ["j-0-0", "j-1-0"]
    assert plan.status["shardCount"] == 2 and plan.status["shardsReady"] == "0/2"
    assert plan.status["progress"]["total"] == 2
    finished = [succeeded(0), succeeded(1)]
    plan = reconcile(job(plan.status, parallelism=8), finished, {}, T0, S, small)
    assert plan.status["phase"] == "Merging" and plan.status["shardsReady"] == "2/2"


def test_no_shard_pods_until_the_summary_is_read() -> None:
    index = build_pod(job(), "index", -1, 0, ShardHistory(), S)
    done = with_state(index, "Succeeded", exit_code=0, reason="Completed")
    plan = reconcile(job({"phase": "Indexing"}), [done], {}, T0, S, None)
    assert names(plan) == [] and plan.status["phase"] == "Running"
    assert plan.requeue_after is not None and plan.requeue_after <= 1.0


def test_index_info_reads_what_the_index_step_writes() -> None:
    from embedjob.operator.views import index_info
    from embedjob.worker.index import IndexSummary

    summary = IndexSummary(shards=2, sequences=5, residues=100, fingerprint="f", model="m",
                           alphabet="protein", inputs=("in.fa",), shard_sequences=(3, 2),
                           shard_residues=(60, 40), max_length=30, requested_shards=4)
    assert index_info(summary.to_json()) == IndexInfo(shards=2, sequences=5)
    assert index_info(b"{") is None and index_info(b'{"shards": 0, "sequences": 0}') is None


def test_policy_history_survives_a_vanished_pod() -> None:
    history = ShardHistory(attempts=2, avoid_nodes=("node-a",), quarantined=("bad",),
                           isolate=("x", "y"), max_tokens=512)
    pod = with_state(worker(0, 1, history), "Running")
    status = reconcile(job(RUNNING), [pod, succeeded(1),
                                      succeeded(2)], {}, T0, S, IDX).status
    entry = status["manifest"][0]
    assert entry["avoidNodes"] == ["node-a"] and entry["quarantine"] == ["bad"]
    plan = reconcile(job(status), [succeeded(1), succeeded(2)], {}, T0, S, IDX)  # pod gone
    assert names(plan) == ["j-0-2"]
    env = {e["name"]: e.get("value") for e in plan.pods_to_create[0]["spec"]["containers"][0]
           ["env"]}
    assert env["EMBEDJOB_MAX_TOKENS_PER_BATCH"] == "512"
    assert json.loads(env["EMBEDJOB_QUARANTINE"]) == ["bad"]
    affinity = json.dumps(plan.pods_to_create[0]["spec"]["affinity"])
    assert "node-a" in affinity


def test_preemption_reports_gpu_seconds_since_the_last_commit() -> None:
    evicted = with_state(worker(0), "Failed", exit_code=143, reason="Error", started=0,
                         finished=100, message=TerminationMessage(
                             type="preempted", message="SIGTERM").to_json())
    prog = {0: ShardProgress(shard=0, attempt=0, done=5, total=10, updated=T0 + timedelta(
        seconds=70))}
    plan = reconcile(job(RUNNING, resources={"gpus": 2}), [evicted, succeeded(1), succeeded(2)],
                     prog, T0 + timedelta(seconds=100), S, IDX)
    lost = [e.gpu_seconds_lost for e in plan.events if e.reason == "RetryPreempted"]
    assert lost == [60.0]  # 2 GPUs x 30 s since the commit at t=70


# --- the compact status at 10^4 shards ----------------------------------------------------

BIG = 10_000
PATCH_LIMIT = 256 * 1024


def _patch_size(status: dict) -> int:
    """The status as the operator's first patch sends it (the whole status, as JSON)."""
    return len(json.dumps({"status": status}).encode())


def _big_world(attempt: int) -> tuple:
    """10^4 shards all running at once, each with progress; attempt > 0: each was preempted
    once (at a different time), so every entry has a last failure to tell."""
    spec = {"shards": BIG, "parallelism": BIG}
    j = job(RUNNING, **spec)
    pods = []
    for s in range(BIG):
        last = json.dumps({"type": "preempted", "message": "TerminationByKubelet",
                           "time": (T0 + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ")})
        manifest = build_pod(j, "worker", s, attempt, ShardHistory(attempts=attempt + 1), S,
                             last_failure=last if attempt else None)
        pods.append(with_state(manifest, "Running", started=BIG))
    prog = {s: ShardProgress(shard=s, attempt=attempt, done=400 + s % 500, total=1000,
                             rate=2.5, updated=T0) for s in range(BIG)}
    return j, pods, prog, IndexInfo(BIG, 1000 * BIG)


def test_ten_thousand_running_shards_fit_in_a_small_status() -> None:
    j, pods, prog, index = _big_world(0)
    plan = reconcile(j, pods, prog, T0 + timedelta(seconds=BIG), S, index)
    status = plan.status
    assert _patch_size(status) < PATCH_LIMIT
    assert status["shardsRunning"] == f"0-{BIG - 1}"
    assert status["shardAttempts"] == {"0": f"0-{BIG - 1}"}
    assert status["manifest"] == [] and status["manifestOmitted"] == 0
    assert status["progress"]["done"] == sum(p.done for p in prog.values())
    assert plan.pods_to_create == []


def test_ten_thousand_preempted_shards_keep_the_latest_entries() -> None:
    j, pods, prog, index = _big_world(1)
    plan = reconcile(j, pods, prog, T0 + timedelta(seconds=BIG), S, index)
    status = plan.status
    assert _patch_size(status) < PATCH_LIMIT
    kept = [e["shard"] for e in status["manifest"]]
    assert kept == list(range(BIG - MANIFEST_CAP, BIG))  # the most recent failures
    assert status["manifestOmitted"] == BIG - MANIFEST_CAP
    assert status["shardAttempts"] == {"1": f"0-{BIG - 1}"}
    # An omitted shard whose pod vanished: its attempt comes from shardAttempts, so the
    # replacement is attempt 2 (part names stay unique), not a second attempt 0 or 1.
    again = reconcile(job(status, shards=BIG, parallelism=BIG), pods[1:], prog,
                      T0 + timedelta(seconds=BIG + 1), S, index)
    assert names(again) == ["j-0-2"]
    assert [e.reason for e in again.events] == ["RetryPreempted"]


def test_a_summarised_shard_is_rederived_from_status_and_pods() -> None:
    pods = [running(0), running(1), running(2)]
    status = reconcile(job(RUNNING), pods, {}, T0, S, IDX).status
    assert status["manifest"] == []
    # Operator restart: same status, same pods -> nothing to do.
    same = reconcile(job(status), pods, {}, T0, S, IDX)
    assert same.pods_to_create == [] and same.status == status
    # Shard 1's pod vanished with its node: preempted, attempt 1.
    plan = reconcile(job(status), [pods[0], pods[2]], {}, T0, S, IDX)
    assert names(plan) == ["j-1-1"] and plan.events[0].reason == "RetryPreempted"
    entry = next(e for e in plan.status["manifest"] if e["shard"] == 1)
    assert entry["attempt"] == 1 and entry["lastFailure"]["type"] == "preempted"
    assert plan.status["shardAttempts"] == {"0": "0,2", "1": "1"}


def test_suspended_summarised_shards_resume_at_the_next_attempt() -> None:
    pods = [running(0), running(1), running(2)]
    status = reconcile(job(RUNNING, suspend=True), pods, {}, T0, S, IDX).status
    assert status["manifest"] == [] and status["shardAttempts"] == {"0": "0-2"}
    resumed = reconcile(job(status), [], {}, T0, S, IDX)
    assert sorted(names(resumed)) == ["j-0-1", "j-1-1", "j-2-1"]
