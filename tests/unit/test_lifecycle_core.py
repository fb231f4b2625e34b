"""The shared lifecycle core: progress records, ended attempts, the status pieces. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from embedjob.attempts import Ended, from_process, notice, settle
from embedjob.failures import EXIT_CUDA, Failure, FailureType, TerminationMessage
from embedjob.policy import ShardHistory
from embedjob.progress import (
    HeartbeatRecord,
    ShardProgress,
    heartbeat_document,
    parse_heartbeat,
    parse_progress,
    progress_document,
)
from embedjob.spec import EmbeddingJobSpec, Phase, ShardState
from embedjob.status import Count, job_conditions, job_progress
from embedjob.times import duration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SPEC = EmbeddingJobSpec.model_validate(
    {"input": {"uri": "in.fa"}, "output": {"uri": "out"}, "retry": {"backoffSeconds": 5}})


def test_progress_record_round_trips_through_the_one_schema() -> None:
    record = ShardProgress(shard=3, attempt=2, total=100, done=40, parts=4, rate=1.23456,
                           updated=T0)
    data = progress_document(record, batch_tokens=4096, precision="bf16", quarantined=1,
                             extra={"gpuMemory": 7})
    back = parse_progress(3, data)
    assert back == ShardProgress(shard=3, attempt=2, total=100, done=40, parts=4, rate=1.235,
                                 updated=T0)
    assert parse_progress(3, b"{not json") is None


def test_heartbeat_record_round_trips() -> None:
    beat = HeartbeatRecord(attempt=1, stage="embedding", beat=9, passes=8, slowest_pass=0.5,
                           embedded=30, committed_at_start=10, rate=2.0, time=5.0)
    assert parse_heartbeat(heartbeat_document(beat)) == beat
    assert beat.in_flight_total == 40
    assert parse_heartbeat(b'{"stage": "x"}') is None  # no attempt: says nothing


def test_one_duration_format() -> None:
    assert [duration(s) for s in (5, 65, 3725, 93600)] == ["5s", "1m05s", "1h02m", "1d02h"]


def test_progress_counts_in_flight_and_rounds_once() -> None:
    p = job_progress([Count(done=10, total=10), Count(done=3, total=10, rate=2.0, in_flight=1)])
    assert (p.done, p.total, p.percent, p.eta_seconds, p.eta) == (13, 20, 65.0, 3.0, "3s")
    assert job_progress([], all_done=True).percent == 100.0


def test_termination_message_is_read_once_and_its_fields_travel() -> None:
    text = TerminationMessage(type="numerical", message="NaN", committed=7,
                              precision="bf16").to_json()
    ended = from_process(1, 82, text, finished=T0, start_done=5, seen_done=6)
    assert ended.committed == 7 and ended.made_progress
    assert ended.failure is not None and ended.failure.precision == "bf16"
    settled = settle(SPEC, ShardHistory(attempts=2), ended, T0)
    assert settled.state == ShardState.pending and settled.history.precision == "fp32"
    assert settled.failure_type is FailureType.numerical


def test_a_published_shard_is_a_success_whatever_the_exit_code() -> None:
    ended = from_process(0, 143, "", finished=T0, start_done=0, seen_done=10, published=True)
    assert ended.failure is None
    assert settle(SPEC, ShardHistory(), ended, T0).state == ShardState.succeeded


def test_backoff_and_the_event_reason_carry_the_type_as_a_field() -> None:
    ended = Ended(0, Failure(FailureType.generic, "boom"), T0)
    settled = settle(SPEC, ShardHistory(attempts=1), ended, T0 + timedelta(seconds=1))
    assert settled.state == ShardState.backoff
    assert settled.not_before == T0 + timedelta(seconds=5)
    note = notice(settled, "shard 0", 0)
    assert note.reason == "RetryGeneric" and note.failure_type is FailureType.generic
    later = settle(SPEC, ShardHistory(attempts=1), ended, T0 + timedelta(seconds=6))
    assert later.state == ShardState.pending


def test_no_termination_message_uses_the_exit_code_and_the_log() -> None:
    ended = from_process(0, EXIT_CUDA, "", finished=T0, start_done=0, seen_done=0,
                         log_tail="CUDA error: device-side assert")
    assert ended.failure is not None and ended.failure.type is FailureType.cuda_error
    assert ended.failure.message.endswith("device-side assert")


def test_conditions_keep_their_transition_time() -> None:
    first = job_conditions([], Phase.running, "", [], T0)
    again = job_conditions(first, Phase.running, "", [], T0 + timedelta(hours=1))
    assert first == again
    failed = job_conditions(again, Phase.failed, "shard 0 failed", [], T0 + timedelta(hours=2))
    cond = {c.type: c for c in failed}["Failed"]
    assert cond.reason == "ShardFailed" and cond.last_transition_time == "2026-01-01T02:00:00Z"
