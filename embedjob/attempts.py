"""How an attempt ended, and what follows it: the one shard lifecycle of both runners.

An attempt's end is read once into an :class:`Ended` (by the operator from its pod, see
``embedjob.operator.observe``; by the local runner from its process, :func:`from_process`).
:func:`settle` applies the retry policy (:mod:`embedjob.policy`) and returns a
:class:`Settled`: the shard's next state and history, when it may start again, and the
decision with its failure type, which Events, metrics and logs read as fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from embedjob.failures import Failure, FailureType, TerminationMessage, classify_exit
from embedjob.policy import Decision, ShardHistory, decide, worker_env
from embedjob.spec import EmbeddingJobSpec, LastFailure, ShardState, dump_spec
from embedjob.times import format_time

LAST_FAILURE_MAX = 300


def attempt_env(spec: EmbeddingJobSpec, job: str, shard: int, attempt: int,
                history: ShardHistory, termination_log: str,
                spec_json: str | None = None) -> dict[str, str]:
    """The worker's contract, as both runners start an attempt: what it runs, who it is, and
    the policy's overrides (docs/architecture.md). ``spec_json``: :func:`spec_text` of
    ``spec``, when the caller already has it (one per job, not one per pod)."""
    return {
        "EMBEDJOB_SPEC": spec_json or spec_text(spec),
        "EMBEDJOB_JOB": job,
        "EMBEDJOB_SHARD": str(max(shard, 0)),
        "EMBEDJOB_ATTEMPT": str(attempt),
        "EMBEDJOB_TERMINATION_LOG": termination_log,
        **worker_env(history),
    }


def spec_text(spec: EmbeddingJobSpec) -> str:
    """The spec as a worker receives it in EMBEDJOB_SPEC."""
    return json.dumps(dump_spec(spec), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Ended:
    """One attempt's end, read once."""

    attempt: int
    failure: Failure | None
    """None: the attempt succeeded."""
    finished: datetime
    message: TerminationMessage | None = None
    """The worker's termination message, parsed once (None: it wrote none)."""
    start_done: int = 0
    """Sequences committed when the attempt started."""
    committed: int = 0
    """Sequences committed when it ended: its last progress.json or its last word."""
    exit_code: int | None = None

    @property
    def made_progress(self) -> bool:
        return self.committed > self.start_done

    @property
    def failure_type(self) -> FailureType | None:
        return self.failure.type if self.failure is not None else None


def committed_by(message: TerminationMessage | None, seen: int) -> int:
    """The attempt's last word beats a progress.json read before its final checkpoint."""
    return max(seen, message.committed if message is not None else 0)


def from_process(
    attempt: int, exit_code: int, termination: str, *, finished: datetime, start_done: int,
    seen_done: int, published: bool = False, stuck: str = "", log_tail: str = "",
) -> Ended:
    """A local worker process's end: exit code, termination-log text, what the runner saw.

    ``published``: the shard's done record exists (a signal cut the exit short after it);
    ``stuck``: why the runner judged it stuck and killed it.
    """
    message = TerminationMessage.from_json(termination)
    committed = committed_by(message, seen_done)
    base = Ended(attempt, None, finished, message, start_done, committed, exit_code)
    if exit_code == 0 or published:
        return base
    if stuck:
        return replace(base, failure=Failure(FailureType.stuck, stuck))
    failure = classify_exit(exit_code, message)
    if message is None:
        tail = f": {log_tail[-300:]}" if log_tail else ""
        failure = replace(failure, message=f"worker exited with code {exit_code}{tail}")
    return replace(base, failure=failure)


@dataclass(frozen=True)
class Settled:
    """What follows an ended attempt."""

    state: ShardState
    """succeeded, pending (start again now), backoff (not before ``not_before``), failed."""
    history: ShardHistory
    decision: Decision | None = None
    """None when the attempt succeeded."""
    failure_type: FailureType | None = None
    last_failure: LastFailure | None = None
    not_before: datetime | None = None

    @property
    def reason(self) -> str:
        return self.decision.reason if self.decision is not None else "shard complete"

    @property
    def delay_seconds(self) -> float:
        return self.decision.delay_seconds if self.decision is not None else 0.0


def settle(spec: EmbeddingJobSpec, history: ShardHistory, ended: Ended,
           now: datetime) -> Settled:
    """Apply the policy to an ended attempt. Pure: same inputs, same answer."""
    if ended.failure is None:
        return Settled(ShardState.succeeded, history)
    failure = ended.failure
    decision = decide(spec, history, failure, ended.made_progress)
    last = LastFailure(type=failure.type.value, message=failure.message[:LAST_FAILURE_MAX],
                       time=format_time(ended.finished))
    if not decision.retry:
        return Settled(ShardState.failed, decision.history, decision, failure.type, last)
    not_before = ended.finished + timedelta(seconds=decision.delay_seconds)
    state = ShardState.backoff if now < not_before else ShardState.pending
    return Settled(state, decision.history, decision, failure.type, last,
                   not_before if state == ShardState.backoff else None)


def next_history(settled: Settled, attempt: int) -> ShardHistory:
    """The history the next attempt (``attempt + 1``) starts with."""
    return replace(settled.history, attempts=attempt + 2)


@dataclass(frozen=True)
class Notice:
    """An ended attempt as one line for people: an Event, a log line, the live view."""

    warning: bool
    reason: str
    """The Event reason: RetryPreempted, RetryGpuOom, …, ShardFailed, StepFailed."""
    text: str
    failure_type: FailureType | None


def notice(settled: Settled, label: str, attempt: int, step: bool = False) -> Notice:
    """``label``: 'shard 3', 'index', 'finalize' (``step``: not a shard)."""
    text = f"{label} attempt {attempt}: {settled.reason}"
    kind = settled.failure_type
    if settled.state == ShardState.failed:
        return Notice(True, "StepFailed" if step else "ShardFailed", text, kind)
    if kind is None:
        return Notice(False, "Completed", text, None)
    camel = "".join(part.capitalize() for part in kind.value.split("_"))
    return Notice(kind is not FailureType.preempted, f"Retry{camel}", text, kind)
