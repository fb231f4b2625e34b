"""Table-driven tests of the pure retry policy (DESIGN §5)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from embedjob.failures import Failure, FailureType
from embedjob.policy import MAX_ISOLATED_RUNS, Decision, ShardHistory, decide, worker_env
from embedjob.spec import parse_spec

F = FailureType


def spec(**over: Any):
    base: dict[str, Any] = {
        "input": {"uri": "in.fa"},
        "output": {"uri": "out/"},
        "model": {"maxTokensPerBatch": 4096},
    }
    base.update(over)
    return parse_spec(base)


def hist(**kw: Any) -> ShardHistory:
    return ShardHistory(**kw)


def run_sequence(s, failures: list[tuple[Failure, bool]]) -> list[Decision]:
    """Feed failures one after another, threading the history, as a runner does."""
    h, out = ShardHistory(), []
    for failure, progress in failures:
        d = decide(s, replace(h, attempts=h.attempts + 1), failure, progress)
        out.append(d)
        h = d.history
    return out


SINGLE = [
    # (name, spec overrides, history, failure, progress, action, check)
    ("preempted retries at once", {}, hist(), Failure(F.preempted, "SIGTERM"), False, "retry",
     lambda d: d.delay_seconds == 0 and d.history.preemptions_in_a_row == 1
     and not d.history.failures),
    ("preempted cap in a row", {"retry": {"preempted": 3}}, hist(preemptions_in_a_row=2),
     Failure(F.preempted, ""), False, "fail", lambda d: "3 times in a row" in d.reason),
    ("preempted with progress resets", {"retry": {"preempted": 3}},
     hist(preemptions_in_a_row=2), Failure(F.preempted, ""), True, "retry",
     lambda d: d.history.preemptions_in_a_row == 0),
    ("gpu oom halves budget", {}, hist(), Failure(F.gpu_oom, "CUDA OOM"), False, "retry",
     lambda d: d.history.max_tokens == 2048 and d.history.failures == {"gpu_oom": 1}),
    ("gpu oom halves the override", {}, hist(max_tokens=1024), Failure(F.gpu_oom, ""), False,
     "retry", lambda d: d.history.max_tokens == 512),
    ("gpu oom floor", {}, hist(max_tokens=256), Failure(F.gpu_oom, ""), False, "fail",
     lambda d: "smallest token budget" in d.reason),
    ("gpu oom over budget", {"retry": {"gpuOom": 2}}, hist(failures={"gpu_oom": 1}),
     Failure(F.gpu_oom, "x"), False, "fail", lambda d: "gpu_oom 2 time(s)" in d.reason),
    ("gpu oom with progress never over budget", {"retry": {"gpuOom": 2}},
     hist(failures={"gpu_oom": 1}), Failure(F.gpu_oom, "x"), True, "retry",
     lambda d: d.history.failures == {}),
    ("host oom smaller then give up", {}, hist(failures={"host_oom": 1}),
     Failure(F.host_oom, "OOMKilled"), False, "fail", lambda d: "host_oom" in d.reason),
    ("host oom first", {}, hist(), Failure(F.host_oom, "OOMKilled"), False, "retry",
     lambda d: d.history.max_tokens == 2048),
    ("numerical fp16 -> bf16", {"model": {"precision": "fp16"}}, hist(),
     Failure(F.numerical, "NaN"), False, "retry", lambda d: d.history.precision == "bf16"),
    ("numerical auto assumes fp16", {}, hist(), Failure(F.numerical, "NaN"), False, "retry",
     lambda d: d.history.precision == "bf16"),
    ("numerical auto resolved bf16", {}, hist(),
     Failure(F.numerical, "NaN in bf16", precision="bf16"), False,
     "retry", lambda d: d.history.precision == "fp32"),
    ("numerical override bf16 -> fp32", {}, hist(precision="bf16"), Failure(F.numerical, ""),
     False, "retry", lambda d: d.history.precision == "fp32"),
    ("numerical fp32 fails", {"model": {"precision": "fp32"}}, hist(),
     Failure(F.numerical, "NaN"), False, "fail", lambda d: "fp32" in d.reason),
    ("input error fails at once", {}, hist(), Failure(F.input_error, "bad residue X at 3"),
     False, "fail", lambda d: d.reason == "bad residue X at 3"),
    ("storage permanent fails", {}, hist(), Failure(F.storage_error, "AccessDenied"), False,
     "fail", lambda d: d.reason == "AccessDenied"),
    ("storage transient backs off", {"retry": {"backoffSeconds": 5}},
     hist(failures={"storage_error": 2}), Failure(F.storage_error, "503", transient=True),
     False, "retry", lambda d: d.delay_seconds == 20),
    ("storage transient budget", {"retry": {"storageError": 3}},
     hist(failures={"storage_error": 2}), Failure(F.storage_error, "503", transient=True),
     False, "fail", lambda d: "storage_error" in d.reason),
    ("stuck replaced", {}, hist(), Failure(F.stuck, "no progress for 900s"), False, "retry",
     lambda d: d.delay_seconds == 0 and d.history.failures == {"stuck": 1}),
    ("generic backoff capped", {"retry": {"backoffSeconds": 100, "maxBackoffSeconds": 150,
                                          "generic": 9}},
     hist(failures={"generic": 3}), Failure(F.generic, "boom"), False, "retry",
     lambda d: d.delay_seconds == 150),
    ("generic first backoff", {"retry": {"backoffSeconds": 7}}, hist(),
     Failure(F.generic, "boom"), False, "retry", lambda d: d.delay_seconds == 7),
    ("generic budget", {"retry": {"generic": 1}}, hist(), Failure(F.generic, "boom"), False,
     "fail", lambda d: "boom" in d.reason),
    ("cuda avoids node", {}, hist(), Failure(F.cuda_error, "device assert", node="n1"), False,
     "retry", lambda d: d.history.avoid_nodes == ("n1",) and "n1" in d.reason),
    ("cuda circuit breaker", {}, hist(failures={"cuda_error": 1}, avoid_nodes=("n1",)),
     Failure(F.cuda_error, "device assert", node="n2"), False, "fail",
     lambda d: d.history.avoid_nodes == ("n1", "n2")),
    ("cuda same batch twice bisects", {}, hist(failures={"cuda_error": 1}, suspects=("4-9",)),
     Failure(F.cuda_error, "assert", ids=("b", "a"), rows="4-9"), False, "retry",
     lambda d: d.isolate == ("4-9",) and d.history.suspects == ()),
    ("a smaller batch inside the suspects is a repeat", {},
     hist(failures={"cuda_error": 1}, suspects=("4-9",)),
     Failure(F.cuda_error, "assert", rows="5-7"), False, "retry",
     lambda d: d.isolate == ("5-7",)),
    ("a batch beside the suspects is not", {}, hist(failures={"cuda_error": 1},
                                                    suspects=("4-9",)),
     Failure(F.cuda_error, "assert", rows="8-12"), False, "fail",
     lambda d: "cuda_error" in d.reason),
    ("cuda isolated single id quarantined", {}, hist(isolate=("4-9",)),
     Failure(F.cuda_error, "assert", ids=("b",), rows="6"), False, "retry",
     lambda d: d.history.quarantined == ("b",) and d.isolate == ("4-9",)),
    ("ids alone bisect nothing", {}, hist(failures={"cuda_error": 1}, suspects=("4-9",)),
     Failure(F.cuda_error, "assert", ids=("a",)), False, "fail", lambda d: not d.isolate),
    ("poison single id from worker", {}, hist(),
     Failure(F.poison_input, "x", ids=("z",), rows="3"),
     False, "retry", lambda d: d.history.quarantined == ("z",)),
    ("poison without quarantine fails", {"retry": {"quarantine": False}}, hist(),
     Failure(F.poison_input, "x", ids=("z",), rows="3"), False, "fail",
     lambda d: "retry.quarantine" in d.reason and "z" in d.reason),
    ("poison whose ids did not fit is named by position", {"retry": {"quarantine": False}},
     hist(), Failure(F.poison_input, "x", rows="3-40"), False, "fail",
     lambda d: "position(s) 3-40" in d.reason),
    ("a single poison whose id did not fit is refused in one line", {}, hist(isolate=("0-9",)),
     Failure(F.cuda_error, "x", rows="3"), False, "fail",
     lambda d: "too long to quarantine" in d.reason and d.history.quarantined == ()),
    ("unschedulable spends nothing", {}, hist(), Failure(F.unschedulable, "no GPU"), False,
     "retry", lambda d: d.history == ShardHistory()),
    ("admission refusal spends no generic budget", {"retry": {"generic": 1}}, hist(),
     Failure(F.node_admission, "UnexpectedAdmissionError: devices unavailable", node="g1"),
     False, "retry", lambda d: d.delay_seconds == 0 and d.history.avoid_nodes == ("g1",)
     and d.history.failures == {"node_admission": 1} and "g1" in d.reason),
    ("admission refusal keeps preemptions in a row", {}, hist(preemptions_in_a_row=4),
     Failure(F.node_admission, "OutOfcpu"), False, "retry",
     lambda d: d.history.preemptions_in_a_row == 4),
    ("admission refusals never wait", {"retry": {"backoffSeconds": 5}},
     hist(failures={"node_admission": 9}), Failure(F.node_admission, "OutOfcpu"), False,
     "retry", lambda d: d.delay_seconds == 0),
    ("admission refusal cap", {"retry": {"nodeAdmission": 3}},
     hist(failures={"node_admission": 2}), Failure(F.node_admission, "OutOfnvidia.com/gpu"),
     False, "fail", lambda d: "3 times" in d.reason and "device plugin" in d.reason),
    ("disk eviction is not a preemption", {"retry": {"backoffSeconds": 5}}, hist(),
     Failure(F.disk, "Evicted: ephemeral storage", node="n1"), False, "retry",
     lambda d: d.history.failures == {"disk": 1} and d.history.preemptions_in_a_row == 0
     and d.delay_seconds == 5 and d.history.avoid_nodes == ("n1",)),
    ("disk budget names the setting", {"retry": {"disk": 2}}, hist(failures={"disk": 1}),
     Failure(F.disk, "Evicted: ephemeral storage"), False, "fail",
     lambda d: "disk 2 time(s)" in d.reason and "cacheSizeLimit" in d.reason),
]


@pytest.mark.parametrize(
    ("over", "history", "failure", "progress", "action", "check"),
    [row[1:] for row in SINGLE],
    ids=[row[0] for row in SINGLE],
)
def test_decide(over, history, failure, progress, action, check) -> None:
    d = decide(spec(**over), history, failure, progress)
    assert d.action == action, d.reason
    assert check(d), d
    assert "\n" not in d.reason and d.reason


def test_flaky_spot_pool_never_fails_while_progressing() -> None:
    s = spec(retry={"preempted": 2})
    seq = [(Failure(F.preempted, "spot"), True)] * 50
    assert all(d.retry for d in run_sequence(s, seq))


def test_cuda_error_twice_on_different_batches_fails() -> None:
    s = spec()
    seq = [
        (Failure(F.cuda_error, "e", node="n1", ids=("a",), rows="0"), False),
        (Failure(F.cuda_error, "e", node="n2", ids=("b",), rows="1"), False),
    ]
    assert [d.action for d in run_sequence(s, seq)] == ["retry", "fail"]


def test_poison_batch_bisected_then_quarantined_then_done() -> None:
    """The batch is known by its run of positions, never by its ids: however long they
    are, the history stays a few bytes."""
    s = spec()
    batch = tuple("x" * 5000 + str(i) for i in range(4))  # ids far past 4 KiB together
    seq = [
        (Failure(F.cuda_error, "assert", node="n1", ids=(), rows="120-123"), False),
        (Failure(F.cuda_error, "assert", node="n2", ids=(), rows="120-123"), False),
        (Failure(F.cuda_error, "assert", node="n3", ids=(batch[2],), rows="122"), False),
    ]
    d1, d2, d3 = run_sequence(s, seq)
    assert d1.retry and d1.history.suspects == ("120-123",)
    assert d2.retry and d2.isolate == ("120-123",) and "one by one" in d2.reason
    assert d3.retry and d3.history.quarantined == (batch[2],)
    env = worker_env(d3.history)
    assert json.loads(env["EMBEDJOB_QUARANTINE"]) == [batch[2]]
    assert json.loads(env["EMBEDJOB_ISOLATE"]) == ["120-123"]
    assert len(d2.history.to_json()) < 200  # the ids alone are 20 kB


def test_isolated_runs_stay_bounded() -> None:
    h = hist()
    for k in range(40):
        h = replace(h, suspects=(f"{10 * k}-{10 * k + 5}",))
        d = decide(spec(), h, Failure(F.cuda_error, "a", rows=f"{10 * k}-{10 * k + 5}"), True)
        h = d.history
    assert len(h.isolate) == MAX_ISOLATED_RUNS and h.isolate[-1] == "390-395"


def test_oom_walks_down_to_floor_then_fails() -> None:
    s = spec(retry={"gpuOom": 100})
    decisions = run_sequence(s, [(Failure(F.gpu_oom, "oom"), False)] * 6)
    assert [d.history.max_tokens for d in decisions[:4]] == [2048, 1024, 512, 256]
    assert decisions[4].action == "fail"


def test_history_round_trips_through_json() -> None:
    h = ShardHistory(
        attempts=3, failures={"gpu_oom": 2}, max_tokens=512, precision="bf16",
        avoid_nodes=("n1",), suspects=("3-9",), isolate=("3-9", "12"), quarantined=("d",),
    )
    assert ShardHistory.from_json(h.to_json()) == h
    assert ShardHistory().to_json() == "{}"
    assert ShardHistory.from_json("not json") == ShardHistory()


def test_worker_env_empty_by_default() -> None:
    assert worker_env(ShardHistory()) == {}
    env = worker_env(ShardHistory(max_tokens=512, precision="fp32"))
    assert env == {"EMBEDJOB_MAX_TOKENS_PER_BATCH": "512", "EMBEDJOB_PRECISION": "fp32"}


def test_decide_is_pure() -> None:
    s, h = spec(), ShardHistory(failures={"generic": 1})
    f = Failure(F.generic, "x")
    assert decide(s, h, f, False) == decide(s, h, f, False)
    assert h.failures == {"generic": 1}


def test_nan_under_auto_on_cpu_is_not_retried_at_a_lower_precision() -> None:
    from embedjob.failures import Failure, FailureType
    from embedjob.policy import ShardHistory, decide
    from embedjob.spec import EmbeddingJobSpec

    spec = EmbeddingJobSpec.model_validate({"input": {"uri": "a"}, "output": {"uri": "o"}})
    failure = Failure(FailureType.numerical, "NaN/Inf in 1 embedding(s) at fp32: run at a ...",
                      precision="fp32")
    decision = decide(spec, ShardHistory(attempts=1), failure, made_progress=False)
    assert decision.action == "fail"
    on_gpu = Failure(FailureType.numerical, "NaN/Inf in 2 embeddings (first: x) at bf16: retry",
                     precision="bf16")
    assert decide(spec, ShardHistory(attempts=1), on_gpu, False).history.precision == "fp32"


def test_admission_refusals_alone_never_fail_within_the_default_cap() -> None:
    """Five fresh GPU nodes in a row without their device plugin: the shard waits, it does
    not fail (the generic budget of 3 used to fail it, and with it the job)."""
    refused = Failure(F.node_admission, "UnexpectedAdmissionError: devices unavailable")
    decisions = run_sequence(spec(), [(replace(refused, node=f"g{i}"), False) for i in range(5)])
    assert all(d.retry for d in decisions), decisions[-1].reason
    assert decisions[-1].history.avoid_nodes == ("g0", "g1", "g2", "g3", "g4")
    assert decisions[-1].history.count(F.generic) == 0
