from embedjob.failures import Failure, FailureType
from embedjob.local.scheduler import Outcome, Shard, finish, ready, start, status_of
from embedjob.spec import EmbeddingJobSpec, Phase, ShardState

SPEC = EmbeddingJobSpec.model_validate(
    {"input": {"uri": "in.fa"}, "output": {"uri": "out"}, "shards": 3,
     "retry": {"backoffSeconds": 5}}
)


def test_ready_respects_slots_and_backoff() -> None:
    shards = [Shard(0), Shard(1, state=ShardState.backoff, not_before=100.0), Shard(2)]
    assert [s.index for s in ready(shards, now=50.0, free_slots=5)] == [0, 2]
    assert [s.index for s in ready(shards, now=150.0, free_slots=1)] == [0]


def test_attempt_numbers_increase() -> None:
    shard = Shard(0)
    assert start(shard) == 0 and start(shard) == 1 and shard.attempt == 1


def test_preemption_retries_at_once_and_input_error_fails() -> None:
    shard = Shard(0, total=10)
    start(shard)
    outcome, _ = finish(SPEC, shard, Failure(FailureType.preempted, "SIGTERM"), False, now=0.0)
    assert outcome is Outcome.retry and shard.state is ShardState.pending
    start(shard)
    outcome, reason = finish(SPEC, shard, Failure(FailureType.input_error, "bad"), False, 0.0)
    assert outcome is Outcome.failed and shard.state is ShardState.failed and reason


def test_generic_failure_backs_off() -> None:
    shard = Shard(0)
    start(shard)
    outcome, _ = finish(SPEC, shard, Failure(FailureType.generic, "x"), False, now=10.0)
    assert outcome is Outcome.retry and shard.state is ShardState.backoff
    assert shard.not_before > 10.0


def test_status_is_compact() -> None:
    shards = [Shard(k, total=10, done=10, state=ShardState.succeeded) for k in range(1000)]
    shards[500] = Shard(500, total=10, done=3, state=ShardState.running, rate=2.0)
    status = status_of(shards, Phase.running)
    assert status.shards_done == "0-499,501-999"
    assert [e.shard for e in status.manifest] == [500]
    assert status.progress.done == 9993 and status.progress.eta_seconds == 3.5
