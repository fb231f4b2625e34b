"""Observe: a job's pods sorted into buckets once, and an ended pod read once. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from embedjob.attempts import Ended, committed_by
from embedjob.failures import Failure, TerminationMessage
from embedjob.operator import classify as cls
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import Observed
from embedjob.operator.incremental import Entries, UnitMemo
from embedjob.operator.names import ROLE_FINALIZE, ROLE_INDEX, ROLE_WORKER
from embedjob.operator.views import IndexInfo, JobView, PodView
from embedjob.progress import ShardProgress
from embedjob.ranges import range_set
from embedjob.spec import EmbeddingJobSpec, EmbeddingJobStatus, Phase
from embedjob.status import attempt_name


@dataclass(frozen=True)
class World:
    """Everything one reconcile pass decides from, sorted once."""

    job: JobView
    spec: EmbeddingJobSpec
    settings: OperatorSettings
    now: datetime
    pods: tuple[PodView, ...]
    latest: Mapping[tuple[str, int], PodView]
    """The newest attempt of each unit (role, shard)."""
    stale: tuple[str, ...]
    """Older attempts' terminated pods: history once a newer one exists."""
    done: frozenset[int]
    failed: frozenset[int]
    entries: Entries
    """The stored manifest, summarised shards re-derived (when read)."""
    progress: Mapping[int, ShardProgress]
    index: IndexInfo | None
    indexed: bool
    """The index step is behind us (its pod succeeded, or shards have started)."""
    beats: Mapping[int, Observed] = field(default_factory=dict)
    """Running shards' heartbeats as last read (operator clock): "stuck" comes from these."""
    memo: UnitMemo | None = None
    """Quiet units of earlier passes (a cache: the pass decides the same without it)."""
    max_creates: int | None = None
    """Most pods this pass may create (None: no limit); see reconcile."""
    floors: Mapping[tuple[str, int], int] = field(default_factory=dict)
    """The first attempt that counts for a unit (role, shard): ended pods below it are
    history, e.g. after a retry-failed request or a shard a finalize step reset."""

    @property
    def shards(self) -> int | None:
        """The effective shard count, once the index summary is read."""
        return self.index.shards if self.index is not None else None

    def first_attempt(self, role: str, shard: int) -> int:
        """The attempt a unit starts at when it has no pod: its floor, or a restart's base."""
        return max(self.floors.get((role, shard), 0), self.job.status.requests.attempt_base)

    @property
    def active_workers(self) -> int:
        return sum(1 for p in self.pods if p.role == ROLE_WORKER and p.active)

    @property
    def stoppable(self) -> tuple[str, ...]:
        """Running pods not being deleted yet."""
        return tuple(p.name for p in self.pods if p.active and not p.deleting)


def observe(
    job: JobView, pods: list[PodView], progress: Mapping[int, ShardProgress], now: datetime,
    settings: OperatorSettings, index: IndexInfo | None,
    beats: Mapping[int, Observed] | None = None,
) -> World:
    spec = job.spec
    assert spec is not None
    old = job.status
    entries = Entries(old, lambda s, a: attempt_name(job.name, ROLE_WORKER, s, a))
    floors = _floors(old, entries)
    base = old.requests.attempt_base
    counted = [p for p in pods if p.active or p.attempt >= floors.get((p.role, p.shard), base)]
    latest = _latest(counted)
    stale = tuple(p.name for p in pods if p.terminated and not p.deleting
                  and getattr(latest.get((p.role, p.shard)), "name", None) != p.name)
    limit = index.shards if index is not None else spec.shards
    done = {s for s in range_set(old.shards_done) | _succeeded_workers(counted) if s < limit}
    return World(
        job=job, spec=spec, settings=settings, now=now, pods=tuple(pods), latest=latest,
        stale=stale, done=frozenset(done), failed=frozenset(range_set(old.shards_failed) - done),
        entries=entries, progress=progress, index=index,
        indexed=_indexed(old.phase, pods, bool(done), entries), beats=beats or {},
        floors=floors,
    )


def _floors(old: EmbeddingJobStatus, entries: Entries) -> dict[tuple[str, int], int]:
    """A shard's recorded attempt, the finalize step's from status.requests, and a
    restart's base for all: a request that re-runs a unit moves its floor past the attempts
    it discards. Read from the entries' attempts, never building the summarised entries."""
    base = old.requests.attempt_base
    floors = {(role, -1): base for role in (ROLE_INDEX, ROLE_FINALIZE)}
    floors |= {(ROLE_WORKER, s): max(a, base) for s, a in entries.attempt_of.items()}
    floors |= {(ROLE_WORKER, s): max(e.attempt, base) for s, e in entries.full.items() if s >= 0}
    floors[(ROLE_FINALIZE, -1)] = max(old.requests.finalize_from, base)
    return floors


def _succeeded_workers(pods: list[PodView]) -> set[int]:
    return {p.shard for p in pods if p.role == ROLE_WORKER and p.phase == "Succeeded"}


def _indexed(phase: Phase, pods: list[PodView], any_done: bool, entries: Entries) -> bool:
    return (
        phase in (Phase.running, Phase.merging) or any_done
        or any(p.role in (ROLE_WORKER, ROLE_FINALIZE) for p in pods)
        or any(p.role == ROLE_INDEX and p.phase == "Succeeded" for p in pods)
        or any(s >= 0 for s in entries)  # shards started before a suspend, their pods gone
    )


def _latest(pods: list[PodView]) -> dict[tuple[str, int], PodView]:
    out: dict[tuple[str, int], PodView] = {}
    for pod in pods:
        key = (pod.role, pod.shard)
        if key not in out or pod.attempt > out[key].attempt:
            out[key] = pod
    return out


def ended_from_pod(
    pod: PodView, prog: ShardProgress | None, now: datetime, failure: Failure | None = None
) -> Ended:
    """How the pod's attempt ended: ``failure`` when the operator stopped it (stuck, node
    lost, vanished), else classified from the pod; the termination message is read here."""
    message = TerminationMessage.from_json(pod.termination_message)
    seen = prog.done if prog is not None and prog.attempt == pod.attempt else 0
    stopped = failure if failure is not None or pod.phase == "Succeeded" else (
        cls.classify_read(pod, message))
    # A pod refused before its container ran has no finish time: count from when it started
    # (or was created), never from ``now``, or its backoff would restart on every pass.
    finished = pod.finished or pod.started or pod.created or now
    return Ended(attempt=pod.attempt, failure=stopped, finished=finished,
                 message=message, start_done=pod.start_done,
                 committed=committed_by(message, seen), exit_code=pod.exit_code)


def past_index(job: JobView, pods: list[PodView]) -> bool:
    """Whether the index step has finished, so that its summary is worth reading."""
    return job.status.phase in (Phase.running, Phase.merging, Phase.suspended) or any(
        p.role != ROLE_INDEX or p.phase == "Succeeded" for p in pods
    )


def ended_attempts(job: JobView, pods: list[PodView]) -> dict[str, int]:
    """Pod name -> shard of worker attempts that failed or vanished (their pod is gone):
    their progress is read once more, so the replacement starts from what they committed."""
    out = {p.name: p.shard for p in pods if p.role == ROLE_WORKER and p.phase == "Failed"}
    present = {p.name for p in pods}
    started = Entries(job.status, lambda s, a: attempt_name(job.name, ROLE_WORKER, s, a))
    for shard, pod in started.pods():
        if shard >= 0 and pod not in present:
            out[pod] = shard
    return out
