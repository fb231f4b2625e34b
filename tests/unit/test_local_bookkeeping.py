"""The local runner's pure parts: outage patience, restore/restart plans, lease, view text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedjob import layout
from embedjob.failures import ConfigError
from embedjob.local.lease import LEASE_KEY, Lease, OutputInUse
from embedjob.local.patience import Patience, duration
from embedjob.local.restart import discard, job_keys, plan_restore
from embedjob.local.scheduler import Shard
from embedjob.local.view import Counter, plural
from embedjob.spec import ShardState
from embedjob.store import FileStore


def test_patience_backs_off_then_gives_up_after_the_limit() -> None:
    p = Patience(limit=300)
    assert p.due(0)
    give_up, line = p.failed(0, "503 SlowDown")
    assert not give_up and "retrying in 2s" in line and "giving up after 5m00s" in line
    assert not p.due(1) and p.due(2)
    delays = []
    for t in (2, 6, 14, 30, 62, 122, 182, 242):
        give_up, line = p.failed(t, "503")
        delays.append(p.next_try - t)
    assert delays[:5] == [4, 8, 16, 32, 60] and max(delays) == 60
    give_up, line = p.failed(300, "503")
    assert give_up and line.startswith("storage unavailable for 5m00s (503)")


def test_patience_says_when_the_store_is_back() -> None:
    p = Patience(limit=60)
    assert p.succeeded(0) is None
    p.failed(10, "x")
    assert p.succeeded(40) == "storage is back after 30s; status saved"
    assert p.since is None and p.due(41)


def test_duration_words() -> None:
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def _shards(n: int = 3) -> list[Shard]:
    return [Shard(k, total=10) for k in range(n)]


def _status(phase: str, *entries: dict) -> dict:
    return {"phase": phase, "message": "shard 1 failed: boom", "manifest": list(entries)}


def test_restore_carries_attempts_budgets_and_overrides() -> None:
    prev = _status("Suspended", {"shard": 1, "state": "Pending", "attempt": 2,
                                 "failures": {"gpu_oom": 1}, "batchTokens": 1024})
    s = plan_restore(_shards(), prev, retry_failed=False)[1]
    assert s.history.attempts == 3 and dict(s.history.failures) == {"gpu_oom": 1}
    assert s.history.max_tokens == 1024


def test_a_failed_job_is_refused_without_retry_failed() -> None:
    prev = _status("Failed", {"shard": 1, "state": "Failed", "attempt": 3,
                              "failures": {"cuda_error": 2},
                              "lastFailure": {"type": "cuda_error", "message": "boom"}})
    with pytest.raises(ConfigError, match="--retry-failed") as err:
        plan_restore(_shards(), prev, retry_failed=False)
    assert "shard 1: boom" in str(err.value)
    s = plan_restore(_shards(), prev, retry_failed=True)[1]
    assert dict(s.history.failures) == {} and s.history.attempts == 4


def test_restart_deletes_the_job_layout_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for key in (layout.SUMMARY, layout.STATUS, layout.MANIFEST, layout.part_key(0, "a0000-000000"),
                layout.shard_done(1), layout.shard_heartbeat(1), "notes/mine.txt"):
        store.write_bytes(key, b"x")
    assert len(job_keys(store)) == 6
    line = discard(store)
    assert "deleted 6 files" in line and "2 shard(s)" in line
    assert list(store.list()) == ["notes/mine.txt"]
    assert "nothing to discard" in discard(store)


def test_a_second_runner_on_a_local_output_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = Lease(FileStore(tmp_path / "out")).acquire()
    try:
        with pytest.raises(OutputInUse, match=r"in use by another `embedjob run` \(pid \d+ on "):
            Lease(FileStore(tmp_path / "out")).acquire()
    finally:
        first.release()
    Lease(FileStore(tmp_path / "out")).acquire().release()  # free again once released


def test_s3_lease_refuses_a_live_holder_and_takes_over_a_stale_one(s3_bucket) -> None:
    from embedjob.store import open_store

    store = open_store(s3_bucket.uri("job/"), s3_bucket.storage)
    first = Lease(store).acquire()
    with pytest.raises(OutputInUse, match="in use by another"):
        Lease(store).acquire()
    stale = json.loads(store.read_bytes(LEASE_KEY))
    stale["expires"] = 0
    store.write_bytes(LEASE_KEY, json.dumps(stale).encode())
    second = Lease(store).acquire()  # its runner died: taken over
    first._renewed = -1e9  # due now: the renewal reads the holder back and sees the loss
    with pytest.raises(OutputInUse):
        first.renew_if_due()
    second.release()
    assert not store.exists(LEASE_KEY)


def test_progress_line_counts_committed_and_in_flight_apart() -> None:
    shards = _shards(2)
    shards[0].state, shards[0].done = ShardState.succeeded, 10
    shards[1].state, shards[1].done, shards[1].in_flight = ShardState.running, 3, 4
    shards[1].rate, shards[1].resumed_at = 2.0, 3
    f = Counter().figures(shards)
    line = Counter.line(f)
    assert line.startswith("13 committed + 4 in flight of 20 sequences (65.0%) · 2.0/s")
    assert "ETA 2s" in line and "resumed at 13" in line
    assert plural(1, "worker") == "1 worker" and plural(2, "worker") == "2 workers"


def test_the_index_notes_fewer_shards_and_truncation() -> None:
    from embedjob.local.view import index_notes
    from embedjob.summary import IndexSummary

    summary = IndexSummary(shards=3, sequences=3, residues=900, fingerprint="sha256:x",
                           model="esm2_t6_8M_UR50D", alphabet="protein", inputs=("a.fa",),
                           shard_sequences=(1, 1, 1), shard_residues=(300, 300, 300),
                           max_length=400, requested_shards=10, max_residues=300, truncated=1)
    assert index_notes(summary, "file:///o/") == [
        "shards: 10 requested, but the input has 3 sequences: running 3 shards",
        "1 sequence longer than model.maxResidues (300) will be embedded truncated (ids in "
        "file:///o/index/truncated.json; longSequences: window embeds them whole)",
    ]


def test_the_live_view_puts_the_bar_and_the_table_header_on_separate_lines() -> None:
    import io

    from rich.console import Console

    from embedjob.local.view import LiveView

    view = LiveView()
    view.console = Console(file=io.StringIO(), width=120, color_system=None)
    view.job = "demo"
    shards = _shards(2)
    shards[0].state, shards[0].done = ShardState.succeeded, 10
    view.console.print(view._render(shards))
    lines = view.console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    bar = next(i for i, ln in enumerate(lines) if "shards done" in ln)
    assert "1/2 shards done" in lines[bar] and "shard" not in lines[bar].replace("shards", "")
    assert lines[bar + 1].split()[:3] == ["shard", "state", "attempt"]
    assert lines[0].startswith("demo: 10 committed + 0 in flight of 20 sequences (50.0%)")


def test_an_s3_lease_of_a_process_gone_from_this_machine_is_not_live() -> None:
    """A runner that gave up in a storage outage (or was killed) could not delete its lease;
    on its own machine a re-run sees that the process is gone, before the expiry."""
    import os
    import subprocess
    import time

    from embedjob.local.lease import _live, process_identity

    ahead = time.time() + 90
    assert _live({"expires": ahead, "process": process_identity(os.getpid())})
    gone = subprocess.run(["sh", "-c", "cat /proc/self/stat"], capture_output=True, text=True)
    assert gone.returncode == 0
    pid = int(gone.stdout.split()[0])
    me = str(process_identity(os.getpid()))
    boot = me.split("/")[0]
    assert not _live({"expires": ahead, "process": f"{boot}/{pid}/1"})  # exited
    assert not _live({"expires": ahead, "process": f"{me}1"})  # the pid reused: other start
    assert _live({"expires": ahead, "process": f"another-boot/{pid}/1"})  # another machine
    assert _live({"expires": ahead})  # no identity: only the expiry tells
    assert not _live({"expires": time.time() - 1, "process": me})
