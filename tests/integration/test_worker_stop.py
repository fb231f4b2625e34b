"""SIGTERM is honoured at every stage of a worker, and the heartbeat moves per forward pass.

Real worker processes and real signals; a ``stall`` failpoint holds the worker in the stage
under test (as a slow model download, a slow resume or a slow upload would), so a worker
that only looked at the stop flag between batches would hang here until the guard timeout.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from workerkit import (
    Worker,
    committed,
    index,
    make_spec,
    read_shard,
    small_fasta,
    start_worker,
    terminate,
)

from embedjob import layout
from embedjob.failures import EXIT_PREEMPTED
from embedjob.store import Store

HANG_GUARD = 90  # seconds: only so that a regression fails instead of hanging the suite


def heartbeat(store: Store, shard: int = 0) -> dict[str, Any]:
    try:
        return json.loads(store.read_bytes(layout.shard_heartbeat(shard)))
    except Exception:
        return {}


def wait_for_beat(store: Store, worker: Worker, timeout: float = 240, **want: Any) -> dict:
    """Until the heartbeat has every ``want`` field (``passes`` means at least)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.proc.poll() is None:
        beat = heartbeat(store)
        if all(beat.get(k) == v if k != "passes" else beat.get(k, 0) >= v
               for k, v in want.items()):
            return beat
        time.sleep(0.05)
    raise AssertionError(f"no heartbeat {want} (last {heartbeat(store)}): {worker.output()}")


def stopped(worker: Worker) -> dict[str, Any]:
    assert worker.wait(timeout=HANG_GUARD) == EXIT_PREEMPTED, worker.output()
    msg = worker.message()
    assert msg["type"] == "preempted", msg
    return msg


def finish_and_check(spec, store: Store, tmp: Path, attempt: int, count: int) -> None:
    final = start_worker(spec, tmp, attempt=attempt)
    assert final.wait(timeout=300) == 0, final.output()
    ids, emb = read_shard(store, tmp)
    assert len(ids) == len(set(ids)) == count and emb.shape[0] == count


@pytest.fixture(scope="module")
def fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fasta(tmp_path_factory.mktemp("in") / "in.fa", 8)


def test_sigterm_while_loading_the_model_stops_at_once(fasta, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp_path,
                          env={"EMBEDJOB_FAILPOINTS": "stall:stage=loading,seconds=600"})
    wait_for_beat(store, worker, stage="loading", attempt=0)
    terminate(worker)
    assert "while loading" in stopped(worker)["message"]
    assert not store.exists(layout.shard_done(0))


def test_sigterm_while_resuming_keeps_every_committed_part(fasta, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"), checkpoint={"everySequences": 1},
                     model={"maxTokensPerBatch": 512})
    store = index(spec)
    first = start_worker(spec, tmp_path, env={"EMBEDJOB_FAILPOINTS": "die:batch=3"})
    assert first.wait(timeout=300) == 137, first.output()
    records = sorted(store.list(layout.shard_commits(0)))
    assert records, "the first attempt committed nothing"
    worker = start_worker(spec, tmp_path, attempt=1,
                          env={"EMBEDJOB_FAILPOINTS": "stall:stage=resuming,seconds=600"})
    wait_for_beat(store, worker, stage="resuming", attempt=1)
    terminate(worker)
    assert "while resuming" in stopped(worker)["message"]
    assert sorted(store.list(layout.shard_commits(0))) == records
    finish_and_check(spec, store, tmp_path, 2, 8)


def test_sigterm_while_publishing_stops_at_once_and_a_rerun_publishes(fasta, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp_path,
                          env={"EMBEDJOB_FAILPOINTS": "stall:stage=publishing,seconds=600"})
    wait_for_beat(store, worker, stage="publishing")
    terminate(worker)
    assert "while publishing" in stopped(worker)["message"]
    assert committed(store) == 8 and not store.exists(layout.shard_done(0))
    finish_and_check(spec, store, tmp_path, 1, 8)


def long_proteins(path: Path, count: int, length: int) -> Path:
    rng = random.Random(7)
    path.write_text("".join(
        f">p{i}\n{''.join(rng.choice('ACDEFGHIKLMNPQRSTVWY') for _ in range(length))}\n"
        for i in range(count)))
    return path


def test_sigterm_inside_a_batch_stops_between_forward_passes(tmp_path) -> None:
    # 16 x 1000 residues, 8 per batch: each batch is two 4-sequence forward passes on CPU.
    fasta = long_proteins(tmp_path / "long.fa", 16, 1000)
    spec = make_spec(str(fasta), str(tmp_path / "out"), checkpoint={"everySequences": 8},
                     model={"maxTokensPerBatch": 8100})
    store = index(spec)
    # Pass 3 is the second pass of batch 1: hold it there while the signal arrives.
    worker = start_worker(spec, tmp_path, env={"EMBEDJOB_FAILPOINTS": "stall:pass=3,seconds=4"})
    wait_for_beat(store, worker, stage="embedding", passes=4)
    terminate(worker)
    msg = stopped(worker)
    assert "during a batch" in msg["message"]
    # Batch 0 was committed and kept; batch 1 was abandoned between its passes (a worker
    # checking only between batches would have finished and committed it: 16).
    assert msg["committed"] == committed(store) == 8
    assert heartbeat(store)["passes"] == 4
    finish_and_check(spec, store, tmp_path, 1, 16)


def test_a_forward_pass_longer_than_the_deadline_still_exits_in_time(fasta, tmp_path) -> None:
    spec = make_spec(str(fasta), str(tmp_path / "out"), model={"maxTokensPerBatch": 512},
                     checkpoint={"everySequences": 2, "shutdownDeadlineSeconds": 2})
    store = index(spec)
    worker = start_worker(spec, tmp_path, env={"EMBEDJOB_FAILPOINTS": "stall:pass=2,seconds=600"})
    wait_for_beat(store, worker, stage="embedding", passes=3)
    terminate(worker)
    assert "outlasted the 2s shutdown deadline" in stopped(worker)["message"]
    finish_and_check(spec, store, tmp_path, 1, 8)
