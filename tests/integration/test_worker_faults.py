"""Real worker processes under SIGTERM, SIGKILL, corruption, concurrency and failpoints."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from workerkit import (
    committed,
    index,
    make_spec,
    read_shard,
    small_fasta,
    start_worker,
    terminate,
    uninterrupted,
    wait_for_commits,
)

from embedjob import layout
from embedjob.failures import EXIT_PREEMPTED

N = 48


@pytest.fixture(scope="module")
def fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fasta(tmp_path_factory.mktemp("in") / "in.fa", N)


@pytest.fixture(scope="module")
def reference(fasta: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """An uninterrupted run: what every interrupted run must reproduce."""
    return uninterrupted(fasta, tmp_path_factory.mktemp("ref"))


def assert_exactly_once(store, tmp: Path, reference: dict[str, np.ndarray]) -> None:
    ids, emb = read_shard(store, tmp)
    assert len(ids) == len(set(ids)) == len(reference)
    for i, row in zip(ids, emb, strict=True):
        np.testing.assert_allclose(row, reference[i], rtol=1e-5, atol=1e-5)


def test_sigterm_saves_progress_and_exits_143(fasta, reference, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp_path, env={"EMBEDJOB_FAILPOINTS": "stall:batch=6,seconds=0.5"})
    wait_for_commits(store, 8, worker.proc)
    terminate(worker)
    before = time.monotonic()
    assert worker.wait(timeout=60) == EXIT_PREEMPTED, worker.output()
    stopped_in = time.monotonic() - before
    msg = worker.message()
    assert msg["type"] == "preempted" and msg["committed"] == committed(store) > 0
    assert msg["committed"] >= msg.get("done_this_attempt", 0) > 0, "embedded but not saved"
    saved = committed(store)
    resumed = start_worker(spec, tmp_path, attempt=1)
    assert resumed.wait() == 0, resumed.output()
    out = resumed.output()
    assert '"event":"shard.resume"' in out and f'"committed":{saved}' in out
    assert_exactly_once(store, tmp_path, reference)
    assert stopped_in < 60


def test_sigterm_during_model_load_exits_143_without_output(fasta, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp_path)
    time.sleep(0.5)
    terminate(worker)
    assert worker.wait(timeout=60) == EXIT_PREEMPTED
    assert not store.exists(layout.shard_done(0))


@pytest.mark.parametrize("kills", [pytest.param(3, id="3-kills"),
                                   pytest.param(12, id="12-kills", marks=pytest.mark.slow)])
def test_sigkill_at_random_points_loses_and_duplicates_nothing(
    fasta, reference, tmp_path, kills: int
) -> None:
    rng = random.Random(1234 + kills)
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    attempt = 0
    for _ in range(kills):
        worker = start_worker(spec, tmp_path, attempt=attempt)
        wait_for_commits(store, committed(store) + rng.randint(1, 12), worker.proc)
        time.sleep(rng.uniform(0, 0.4))
        worker.proc.kill()
        worker.wait()
        attempt += 1
        if store.exists(layout.shard_done(0)):
            break
    final = start_worker(spec, tmp_path, attempt=attempt)
    assert final.wait() == 0, final.output()
    assert_exactly_once(store, tmp_path, reference)


def test_corrupted_and_uncommitted_parts_are_redone(fasta, reference, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp_path)
    wait_for_commits(store, 24, worker.proc)
    worker.proc.kill()
    worker.wait()
    parts = sorted(store.list(layout.shard_parts(0)))
    store.write_bytes(parts[0], store.read_bytes(parts[0])[:-50])  # truncated
    data = bytearray(store.read_bytes(parts[1]))
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    store.write_bytes(parts[1], bytes(data))
    store.write_bytes(layout.part_key(0, layout.part_name(0, 999)), b"never committed")
    resumed = start_worker(spec, tmp_path, attempt=1)
    assert resumed.wait() == 0, resumed.output()
    assert resumed.output().count('"event":"part.rejected"') == 2
    assert_exactly_once(store, tmp_path, reference)


def test_two_attempts_writing_at_once_stay_exactly_once(fasta, reference, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    old = start_worker(spec, tmp_path, attempt=0)
    wait_for_commits(store, 8, old.proc)
    new = start_worker(spec, tmp_path, attempt=1)  # the old pod is still running
    assert new.wait() == 0, new.output()
    assert old.wait() == 0, old.output()
    assert_exactly_once(store, tmp_path, reference)


def test_finished_shard_is_not_redone(fasta, reference, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    index(spec)
    assert start_worker(spec, tmp_path).wait() == 0
    again = start_worker(spec, tmp_path, attempt=1)
    assert again.wait() == 0
    assert '"event":"shard.already_done"' in again.output()


@pytest.mark.parametrize(
    ("failpoint", "code", "kind"),
    [
        ("gpu_oom:batch=2", 80, "gpu_oom"),
        ("cuda_error:batch=2", 81, "cuda_error"),
        ("nan:batch=2", 82, "numerical"),
        ("storage_error:batch=2", 75, "storage_error"),
    ],
)
def test_failpoints_map_to_exit_codes_and_keep_earlier_work(
    fasta, tmp_path, failpoint: str, code: int, kind: str
) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"), checkpoint={"everySequences": 1000})
    index(spec)
    worker = start_worker(spec, tmp_path, env={"EMBEDJOB_FAILPOINTS": failpoint})
    assert worker.wait() == code, worker.output()
    msg = worker.message()
    assert msg["type"] == kind and msg["batch"] == 2
    assert msg["committed"] > 0, "batches before the failure must be saved"
    assert "Traceback" not in worker.output()
    if kind == "cuda_error":  # the batch by id (for people) and by positions (for bisection)
        assert len(msg["ids"]) > 0 and msg["rows"]
        lo, _, hi = msg["rows"].partition("-")
        assert int(hi or lo) - int(lo) + 1 >= len(msg["ids"])


def test_kill_leaves_no_message_and_resume_completes(fasta, reference, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp_path, env={"EMBEDJOB_FAILPOINTS": "die:batch=5"})
    assert worker.wait() == 137
    assert not worker.termination_log.exists()  # a kill leaves no message
    assert committed(store) > 0
    resumed = start_worker(spec, tmp_path, attempt=1)
    assert resumed.wait() == 0, resumed.output()
    assert_exactly_once(store, tmp_path, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_both_stop_signals_are_handled(fasta, tmp_path, sig: int) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp_path)
    wait_for_commits(store, 8, worker.proc)
    terminate(worker, sig)
    assert worker.wait(timeout=60) == EXIT_PREEMPTED
