"""The EmbeddingJob status, built once for both runners.

The operator writes it to the API server, ``embedjob run`` to ``status.json``; both call
:func:`job_status` and :func:`dump_status`, so the two documents have the same keys, reasons
and formats for the same events. Pure: times come in as arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from embedjob.policy import ShardHistory
from embedjob.ranges import format_ranges, range_set
from embedjob.spec import (
    Condition,
    EmbeddingJobStatus,
    LastFailure,
    Phase,
    Progress,
    ShardEntry,
    ShardState,
)
from embedjob.status_bound import (
    MESSAGE_MAX,
    STATUS_BUDGET_BYTES,
    dump_entry,
    fit_entries,
    json_size,
)
from embedjob.times import duration, format_time

TERMINAL = (Phase.succeeded, Phase.failed)
MANIFEST_CAP = 500
"""Most full entries in status.manifest: ~250 bytes each keeps a 10^4-shard status small."""
CONDITION_MESSAGE_MAX = 500


# --- progress -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    """One shard's share of the job's progress."""

    done: int
    """Sequences committed (a finished shard: its total)."""
    total: int = 0
    rate: float = 0.0
    """Sequences per second, only while the shard's report is live (0 otherwise)."""
    in_flight: int = 0
    """Embedded by a running attempt but not committed yet (the local runner sees these)."""


def job_progress(counts: Iterable[Count], total: int | None = None,
                 all_done: bool = False) -> Progress:
    """Done, percent (one decimal), rate and ETA (seconds and '1h02m') of the whole job.

    ``total`` is the index's sequence count when known, else the shards' totals add up.
    """
    items = list(counts)
    done = sum(c.done for c in items)
    total = total or sum(c.total for c in items)
    rate = sum(c.rate for c in items)
    left = max(0, total - done - sum(c.in_flight for c in items))
    percent = round(100.0 * done / total, 1) if total else (100.0 if all_done else 0.0)
    eta = left / rate if rate > 0 and left > 0 else None
    return Progress(done=done, total=total, percent=min(percent, 100.0), rate=round(rate, 2),
                    eta_seconds=round(eta, 1) if eta is not None else None,
                    eta=duration(eta) if eta is not None else None)


# --- conditions ---------------------------------------------------------------------------


def job_conditions(
    old: list[Condition], phase: Phase, message: str, unschedulable: list[str], now: datetime
) -> list[Condition]:
    """Complete, Failed, Suspended and Unschedulable, with the operator's reasons."""
    wanted: dict[str, tuple[str, str, str]] = {
        "Complete": ("True", "Succeeded", message) if phase == Phase.succeeded
        else ("False", "InProgress" if phase not in TERMINAL else "Failed", ""),
        "Failed": ("True", "ShardFailed", message) if phase == Phase.failed
        else ("False", "NoFailure", ""),
        "Suspended": ("True", "Suspended", "spec.suspend is true") if phase == Phase.suspended
        else ("False", "NotSuspended", ""),
        "Unschedulable": ("True", "PodsPending", f"{len(unschedulable)} pod(s) unschedulable, "
                          f"e.g. {unschedulable[0]}") if unschedulable
        else ("False", "Scheduled", ""),
    }
    if phase == Phase.failed:  # a reason set before (InvalidSpec, PodRejected) stays
        reason = next((c.reason for c in old if c.type == "Failed" and c.status == "True"), None)
        if reason:
            wanted["Failed"] = ("True", reason, message or wanted["Failed"][2])
    return set_conditions(old, now, wanted)


def set_conditions(
    old: list[Condition], now: datetime, wanted: Mapping[str, tuple[str, str, str]]
) -> list[Condition]:
    """Kubernetes conventions: lastTransitionTime changes only when status changes."""
    by_type = {c.type: c for c in old}
    out = [c for c in old if c.type not in wanted]
    for kind, (status, reason, message) in wanted.items():
        prev = by_type.get(kind)
        since = prev.last_transition_time if prev and prev.status == status else format_time(now)
        out.append(Condition(type=kind, status=status, reason=reason,
                             message=message[:CONDITION_MESSAGE_MAX],
                             last_transition_time=since))
    return out


def condition_key(status: EmbeddingJobStatus) -> list[tuple[str, str, str]]:
    """What makes a status write a transition (patched at once, not at the bounded rate)."""
    return [(c.type, c.status, c.reason) for c in status.conditions]


# --- manifest entries ---------------------------------------------------------------------


def attempt_name(job: str, role: str, shard: int, attempt: int) -> str:
    """An attempt's name: its pod's in a cluster (deterministic, so creating it twice
    conflicts instead of duplicating), the same in the local runner's status."""
    if role == "worker":
        return f"{job}-{shard}-{attempt}"
    return f"{job}-{role}-{attempt}"



def history_fields(history: ShardHistory) -> dict[str, Any]:
    """The policy history as ShardEntry fields (what must survive a vanished pod)."""
    return {
        "failures": {k: v for k, v in history.failures.items() if v},
        "batch_tokens": history.max_tokens,
        "precision": history.precision,
        "quarantined": len(history.quarantined),
        "avoid_nodes": list(history.avoid_nodes),
        "isolate": list(history.isolate),
        "quarantine": list(history.quarantined),
    }


def history_from_entry(entry: ShardEntry) -> ShardHistory:
    """The history back from an entry (when the pod that carried it is gone, or on restart)."""
    return ShardHistory(attempts=entry.attempt + 1, failures=dict(entry.failures),
                        max_tokens=entry.batch_tokens, precision=entry.precision,
                        avoid_nodes=tuple(entry.avoid_nodes), isolate=tuple(entry.isolate),
                        quarantined=tuple(entry.quarantine))


def shard_entry(
    base: ShardEntry | None, shard: int, state: ShardState, *, attempt: int, name: str | None,
    history: ShardHistory, done: int | None = None, total: int | None = None,
    last_failure: LastFailure | None = None,
) -> ShardEntry:
    """One shard's entry: ``base`` (the earlier entry) updated with what is known now
    (``notBefore`` is the caller's: kept unless it sets one)."""
    update: dict[str, Any] = {"state": state, "attempt": attempt, "pod": name,
                              **history_fields(history)}
    if done is not None:
        update |= {"done": done, "total": total or 0}
    if last_failure is not None:
        update["last_failure"] = last_failure
    return (base or ShardEntry(shard=shard)).model_copy(update=update)


def compact_manifest(entries: list[ShardEntry], cap: int,
                     budget: int | None = None) -> tuple[list[ShardEntry], int]:
    """The entries worth a full record, at most ``cap`` (and ``budget`` bytes as JSON:
    :mod:`embedjob.status_bound`), and how many were left out.

    An unremarkable shard (attempt and pod only) is summarised by status.shardAttempts;
    what a left-out entry held is also in its pod's history annotation, and the shard's
    attempt number (which keeps part names unique) is always in shardAttempts.
    """
    notable = [e for e in entries if _notable(e)]
    # Most recent failures first, then whatever changes the next attempt before the rest.
    notable.sort(key=lambda e: e.last_failure.time if e.last_failure else "", reverse=True)
    notable.sort(key=lambda e: not _essential(e))
    kept = notable[:cap] if budget is None else fit_entries(notable, budget, cap)
    return sorted(kept, key=lambda e: e.shard), len(notable) - len(kept)


def _essential(entry: ShardEntry) -> bool:
    """Steps, failed or waiting shards, and overrides the next attempt must start with."""
    return (entry.shard < 0 or entry.state in (ShardState.failed, ShardState.backoff)
            or entry.not_before is not None or entry.batch_tokens is not None
            or entry.precision is not None
            or bool(entry.avoid_nodes or entry.isolate or entry.quarantine))


def _notable(entry: ShardEntry) -> bool:
    return entry.pod is None or _essential(entry) or bool(
        entry.failures or entry.last_failure or entry.quarantined
    )


def attempt_ranges(entries: Iterable[ShardEntry]) -> dict[str, str]:
    """{attempt: shards at that attempt}, for every started shard (status.shardAttempts)."""
    by_attempt: dict[int, list[int]] = {}
    for e in entries:
        if e.shard >= 0 and e.pod is not None:
            by_attempt.setdefault(e.attempt, []).append(e.shard)
    return {str(a): format_ranges(shards) for a, shards in sorted(by_attempt.items())}


def expand_manifest(
    status: EmbeddingJobStatus, name_of: Callable[[int, int], str]
) -> dict[int, ShardEntry]:
    """Full entries plus one re-derived for each shard that shardAttempts summarises
    (``name_of(shard, attempt)``: the attempt's pod or worker name)."""
    entries = {e.shard: e for e in status.manifest}
    running = range_set(status.shards_running)
    for key, ranges in status.shard_attempts.items():
        with contextlib.suppress(ValueError):
            attempt = int(key)
            for shard in range_set(ranges) - set(entries):
                state = ShardState.running if shard in running else ShardState.pending
                entries[shard] = ShardEntry(shard=shard, state=state, attempt=attempt,
                                            pod=name_of(shard, attempt))
    return entries


# --- the whole status ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outline:
    """What a runner decided this pass; :func:`job_status` writes it in the status's form."""

    phase: Phase
    message: str
    shard_count: int
    done: frozenset[int]
    failed: frozenset[int]
    entries: tuple[ShardEntry, ...]
    """Unfinished shards' entries (and a step's own entry, shard -1)."""
    progress: Progress
    generation: int | None = None
    unschedulable: tuple[str, ...] = ()


def job_status(outline: Outline, old: EmbeddingJobStatus, now: datetime,
               cap: int = MANIFEST_CAP) -> EmbeddingJobStatus:
    """The status both runners write for the same outline: at most ``cap`` manifest entries
    and :data:`~embedjob.status_bound.STATUS_BUDGET_BYTES` in all."""
    entries = list(outline.entries)
    running = (e.shard for e in entries if e.shard >= 0 and e.state == ShardState.running)
    base = EmbeddingJobStatus(
        phase=outline.phase,
        conditions=job_conditions(old.conditions, outline.phase, outline.message,
                                  list(outline.unschedulable), now),
        observed_generation=outline.generation,
        progress=outline.progress,
        shards_ready=f"{len(outline.done)}/{outline.shard_count}",
        shards_done=format_ranges(outline.done),
        shards_failed=format_ranges(outline.failed),
        shards_running=format_ranges(running),
        shard_attempts=attempt_ranges(entries),
        shard_count=outline.shard_count,
        manifest_omitted=len(entries),  # as wide as it can get, for the measure below
        message=outline.message[:MESSAGE_MAX],
    )
    budget = STATUS_BUDGET_BYTES - json_size(dump_status(base))
    full, omitted = compact_manifest(entries, cap, budget)
    return base.model_copy(update={"manifest": full, "manifest_omitted": omitted})


def dump_status(status: EmbeddingJobStatus) -> dict[str, Any]:
    """camelCase JSON; manifest entries leave defaults out (thousands of them add up)."""
    data = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["manifest"] = [dump_entry(e) for e in status.manifest]
    data["requests"] = status.requests.model_dump(mode="json", by_alias=True,  # {} until one
                                                  exclude_none=True, exclude_defaults=True)
    return data


def shard_state_counts(status: Mapping[str, Any]) -> dict[str, int]:
    """Shards by state from a status document: the range strings count, the capped
    manifest only refines the started ones (for the operator's metrics)."""
    entries = {e.get("shard"): e.get("state", "Pending") for e in status.get("manifest") or []}
    started: set[int] = set()
    for ranges in (status.get("shardAttempts") or {}).values():
        started |= range_set(ranges)
    running = range_set(status.get("shardsRunning"))
    states: dict[str, int] = {"Running": len(running)}
    for shard in started - running:
        state = entries.get(shard, "Pending")
        states[state] = states.get(state, 0) + 1
    states["Succeeded"] = len(range_set(status.get("shardsDone")))
    return states
