from embedjob.failures import (
    EXIT_PREEMPTED,
    FailureType,
    TerminationMessage,
    classify_exit,
    write_termination_message,
)


def test_termination_message_round_trip_and_size_cap(tmp_path) -> None:
    msg = TerminationMessage(type="cuda_error", message="boom", committed=5, batch=3,
                             ids=[f"seq{i}" for i in range(2000)], rows="1000-2999")
    path = tmp_path / "termination-log"
    write_termination_message(msg, str(path))
    text = path.read_text()
    assert len(text.encode()) <= 4096  # the kubelet keeps at most 4 KiB
    back = TerminationMessage.from_json(text)
    assert back is not None and back.type == "cuda_error" and back.committed == 5
    # The ids did not fit; the batch's positions, which bisection works from, always do.
    assert back.ids == [] and classify_exit(81, back).rows == "1000-2999"


def test_unwritable_termination_log_is_skipped() -> None:
    write_termination_message(TerminationMessage(type="generic", message="x"), "/proc/nope/x")


def test_classify_prefers_the_message_then_the_exit_code() -> None:
    msg = TerminationMessage(type="gpu_oom", message="CUDA out of memory")
    assert classify_exit(80, msg).type is FailureType.gpu_oom
    assert classify_exit(EXIT_PREEMPTED, None).type is FailureType.preempted
    assert classify_exit(-15, None).type is FailureType.preempted  # killed by SIGTERM locally
    assert classify_exit(137, None).type is FailureType.host_oom
    assert classify_exit(75, None).transient
    assert classify_exit(3, None).type is FailureType.generic
    assert TerminationMessage.from_json("not json") is None
