"""What the operator removes once it is no longer needed. Pure.

Finished worker pods: a Succeeded worker pod is deleted once its shard is in
``status.shardsDone`` *as written to the API server* (never a status still pending in the
operator's memory: a crash before that write would otherwise lose the only record). From
then on the shard's history lives in the status and in storage; reconcile counts a done
shard as done without its pod, so a deleted pod is never taken for a vanished attempt.
Index and finalize pods stay (their logs) until the job goes.

Finished jobs: ``spec.ttlSecondsAfterFinished`` after the job turned Succeeded or Failed
(the lastTransitionTime of its Complete or Failed condition), the job is deleted; its pods
go with it (owner references).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from embedjob.operator.names import ROLE_WORKER
from embedjob.operator.views import JobView, PodView
from embedjob.ranges import range_set
from embedjob.spec import EmbeddingJobStatus
from embedjob.status import TERMINAL
from embedjob.times import parse_time


def recorded_pods(pods: Iterable[PodView], written: EmbeddingJobStatus) -> list[str]:
    """Succeeded worker pods whose shard the written status already counts as done."""
    done = range_set(written.shards_done)
    return sorted(p.name for p in pods if p.role == ROLE_WORKER and p.phase == "Succeeded"
                  and p.shard in done and p.deleting is None)


def finished_at(status: EmbeddingJobStatus) -> datetime | None:
    """When the job turned Succeeded or Failed; None while it is not finished."""
    if status.phase not in TERMINAL:
        return None
    kind = "Complete" if status.phase.value == "Succeeded" else "Failed"
    for cond in status.conditions:
        if cond.type == kind and cond.status == "True":
            return parse_time(cond.last_transition_time)
    return None


def ttl_left(job: JobView, written: EmbeddingJobStatus, now: datetime) -> float | None:
    """Seconds until the job is to be deleted (0 or less: now); None: never, or not yet
    finished. Counted from the written status, so a pending transition never starts it."""
    ttl = job.spec.ttl_seconds_after_finished if job.spec is not None else None
    since = finished_at(written) if ttl is not None else None
    if ttl is None or since is None:
        return None
    return ttl - (now - since).total_seconds()
