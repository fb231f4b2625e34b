"""One shard lifecycle: the operator and the local runner decide alike and report alike.

The same scripted attempt outcomes (preempted, GPU OOM, a CUDA error twice on the same
batch, one poison id, NaN, stuck, success) are fed to the operator's pure core (reconcile,
pods as Kubernetes reports them) and to the local runner's (its shard records, processes as
they exit). Both must take the same decisions, and write the same status document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import timedelta

from operator_helpers import T0, job, with_state

from embedjob.attempts import from_process
from embedjob.failures import TerminationMessage
from embedjob.liveness import Beat, beat_interval, verdict
from embedjob.local.scheduler import Shard, record, start, status_of
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import fold
from embedjob.operator.reconcile import reconcile
from embedjob.operator.views import IndexInfo, ShardProgress
from embedjob.progress import HeartbeatRecord
from embedjob.spec import EmbeddingJobSpec, Phase
from embedjob.status import dump_status

S = OperatorSettings()
IDX = IndexInfo(shards=1, sequences=10)
JOB = job({"phase": "Running"}, shards=1)
assert JOB.spec is not None
SPEC: EmbeddingJobSpec = JOB.spec
STEP = 100.0  # seconds each scripted attempt runs


@dataclass(frozen=True)
class Outcome:
    name: str
    exit_code: int
    message: TerminationMessage | None = None
    committed: int = 0
    """Sequences committed when it ended (its progress.json)."""
    stuck: bool = False


def _msg(kind: str, text: str, **fields: object) -> TerminationMessage:
    return TerminationMessage(type=kind, message=text, **fields)  # type: ignore[arg-type]


SCRIPT = [
    Outcome("preempted", 143, _msg("preempted", "SIGTERM", committed=2), committed=2),
    Outcome("gpu oom", 80, _msg("gpu_oom", "CUDA out of memory", committed=2,
                                batch_tokens=4096), committed=2),
    Outcome("cuda error", 81, _msg("cuda_error", "device-side assert", committed=2,
                                   ids=["a", "b"], rows="0-1"), committed=2),
    Outcome("cuda error again", 81, _msg("cuda_error", "device-side assert", committed=2,
                                         ids=["a", "b"], rows="0-1"), committed=2),
    Outcome("poison id", 81, _msg("cuda_error", "device-side assert", committed=2,
                                  ids=["a"], rows="0"), committed=2),
    Outcome("nan", 82, _msg("numerical", "NaN/Inf at bf16", committed=4, precision="bf16"),
            committed=4),
    Outcome("stuck", -9, committed=4, stuck=True),
    Outcome("success", 0, committed=10),
]


def _time(step: int) -> float:
    return (step + 1) * STEP


SILENT = S.stuck_after_seconds + 1
"""How long the stuck attempt's heartbeat stays still before it is judged."""


def _stuck_reason() -> str:
    """The shared rule's words, as both runners get them from liveness.verdict."""
    beat = Beat(stage="embedding", seen_at=0.0, stage_since=0.0)
    judged = verdict(beat, SILENT, stuck_after=S.stuck_after_seconds,
                     beat_interval=beat_interval("s3://b/"))
    assert judged.stuck
    return judged.reason


def operator_run() -> list[tuple[object, ...]]:
    """Drive reconcile with each attempt's pod as it ends."""
    plan = reconcile(JOB, [], {}, T0, S, IDX)
    status, manifest = plan.status, plan.pods_to_create[0]
    seen: list[tuple[object, ...]] = []
    for step, out in enumerate(SCRIPT):
        t = _time(step)
        attempt = int(manifest["metadata"]["labels"]["embedjob.io/attempt"])
        prog = {0: ShardProgress(shard=0, attempt=attempt, total=10, done=out.committed,
                                 updated=T0 + timedelta(seconds=t - STEP))}
        beats = {}
        if out.stuck:
            pod = with_state(manifest, "Running", started=t - STEP, node="")
            now = T0 + timedelta(seconds=t - STEP + SILENT)
            record = HeartbeatRecord(attempt=attempt, stage="embedding", beat=3)
            first = fold(None, attempt, record, (T0.timestamp() + t - STEP), "s3://b/")
            beats = {0: fold(first, attempt, record, now.timestamp(), "s3://b/")}
        elif out.exit_code == 0:
            pod = with_state(manifest, "Succeeded", exit_code=0, reason="Completed",
                             started=t - STEP, finished=t, node="")
            now = T0 + timedelta(seconds=t)
        else:
            text = out.message.to_json() if out.message else None
            pod = with_state(manifest, "Failed", exit_code=out.exit_code, reason="Error",
                             message=text, started=t - STEP, finished=t, node="")
            now = T0 + timedelta(seconds=t)
        current = job({**status, "phase": "Running"}, shards=1)
        plan = reconcile(current, [pod], prog, now, S, IDX, beats)
        decided = [e for e in plan.events if e.key.startswith("decide/")]
        status = plan.status
        seen.append((out.name, [(e.reason, e.failure_type, e.message) for e in decided],
                     _comparable(status)))
        manifest = plan.pods_to_create[0] if plan.pods_to_create else manifest
    return seen


def local_run() -> list[tuple[object, ...]]:
    """Drive the local runner's records with each attempt's process as it exits."""
    shard = Shard(0, total=10)
    attempt = start(shard)
    old = status_of([shard], Phase.running, job="j", now=T0.timestamp())
    seen: list[tuple[object, ...]] = []
    for step, out in enumerate(SCRIPT):
        t = _time(step)
        finished = t - STEP + SILENT if out.stuck else t
        start_done = shard.done
        shard = replace(shard, done=out.committed)  # the runner read progress.json
        ended = from_process(
            attempt, out.exit_code, out.message.to_json() if out.message else "",
            finished=T0 + timedelta(seconds=finished), start_done=start_done,
            seen_done=out.committed, stuck=_stuck_reason() if out.stuck else "")
        settled = record(SPEC, shard, ended, T0.timestamp() + finished)
        note = [] if settled.decision is None else [_local_notice(settled, attempt)]
        old = status_of([shard], Phase.running, job="j", old=old,
                        now=T0.timestamp() + finished)
        seen.append((out.name, note, _comparable(dump_status(old))))
        if settled.decision is not None:
            attempt = start(shard)
    return seen


def _local_notice(settled: object, attempt: int) -> tuple[object, ...]:
    from embedjob.attempts import notice

    note = notice(settled, "shard 0", attempt)  # type: ignore[arg-type]
    return (note.reason, note.failure_type, note.text)


def _comparable(status: dict | None) -> str:
    """The status document, less the one field only a cluster has (the generation)."""
    data = dict(status or {})
    data.pop("observedGeneration", None)
    return json.dumps(data, sort_keys=True)


def test_same_outcomes_same_decisions_same_status() -> None:
    operator, local = operator_run(), local_run()
    for op, lo in zip(operator[:-1], local[:-1], strict=True):
        assert op[1] == lo[1], f"{op[0]}: decisions differ"
        assert op[2] == lo[2], f"{op[0]}: status differs"
    # Once every shard is done the operator moves on to its finalize pod (Merging) in the
    # same pass, the local runner to its finalize call: the shards' part is the same.
    shards_part = ("shardsDone", "shardsReady", "shardsFailed", "progress", "shardAttempts")
    op_done, lo_done = json.loads(operator[-1][2]), json.loads(local[-1][2])
    assert {k: op_done[k] for k in shards_part} == {k: lo_done[k] for k in shards_part}
    assert op_done["shardsDone"] == "0" and operator[-1][1] == local[-1][1] == []


def test_the_script_walks_every_policy_branch() -> None:
    decisions = [d for _, step, _ in operator_run() for d in step]
    reasons = [r for r, _, _ in decisions]
    assert reasons == ["RetryPreempted", "RetryGpuOom", "RetryCudaError", "RetryCudaError",
                       "RetryCudaError", "RetryNumerical", "RetryStuck"]
    final = json.loads(operator_run()[-2][2])["manifest"][0]
    assert final["batchTokens"] == 2048 and final["precision"] == "fp32"
    assert final["quarantine"] == ["a"] and final["isolate"] == ["0-1"]
