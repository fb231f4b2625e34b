"""The operator's storage reads in a child process (operator/read_process.py): a real child,
the same answers as Stores in this process, and a child that dies is replaced."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedjob.operator.config import OperatorSettings
from embedjob.operator.read_process import ReadProcess
from embedjob.operator.storage_access import StorageRefused, job_storage
from embedjob.spec import parse_spec
from embedjob.store import ObjectNotFound

SETTINGS = OperatorSettings()


def where(uri: str):  # type: ignore[no-untyped-def]
    spec = parse_spec({"input": {"uri": "s3://bucket/in.fa"}, "output": {"uri": uri}})
    return job_storage("ns", "j", spec, SETTINGS)


@pytest.fixture
def reads() -> Iterator[ReadProcess]:
    process = ReadProcess(SETTINGS).start()
    try:
        yield process
    finally:
        process.stop()


def test_reads_what_the_store_holds_and_says_what_it_cannot(
        reads: ReadProcess, tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "beat.json").write_bytes(b'{"beat": 3}')
    assert reads.read("uid", where(str(tmp_path)), "shards/beat.json") == b'{"beat": 3}'
    with pytest.raises(ObjectNotFound):
        reads.read("uid", where(str(tmp_path)), "shards/none.json")
    # An S3 output without a credentials Secret: the default jobSecretOnly refuses, for good.
    with pytest.raises(StorageRefused, match=r"operatorStorageIdentity") as refused:
        reads.read("irsa", where("s3://bucket/out/"), "index/summary.json")
    assert refused.value.lasting
    # The heartbeat poll's two requests: a tagged listing and a tagged read that agree.
    (tmp_path / "heartbeats").mkdir()
    (tmp_path / "heartbeats" / "00002.json").write_bytes(b"{}")
    listed = reads.listing("uid", where(str(tmp_path)), "heartbeats/")
    assert reads.read_tagged("uid", where(str(tmp_path)), "heartbeats/00002.json") == (
        b"{}", listed["heartbeats/00002.json"])
    with pytest.raises(ObjectNotFound):
        reads.read_tagged("uid", where(str(tmp_path)), "heartbeats/00003.json")
    assert reads.started == 1


def test_a_child_that_dies_fails_its_reads_and_is_started_again(
        reads: ReadProcess, tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"{}")
    assert reads.read("uid", where(str(tmp_path)), "a.json") == b"{}"
    first = reads.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while reads.pid is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the answer thread sees the pipe close, and says so
    assert reads.pid is None
    assert reads.read("uid", where(str(tmp_path)), "a.json") == b"{}"
    assert reads.started == 2 and reads.pid not in (None, first)
