"""``embedjob run`` with its output on S3 (moto's server) while the store goes away: through
the fault proxy (tests/faultproxy.py) every request gets 503, or its connection is closed.
An outage shorter than ``--storage-patience`` is ridden out with visible retry lines; a longer
one stops the workers and ends the run with exit 75 and one line; a re-run completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_local_run import small_spec, write_job
from test_runner_process import HANG_GUARD, alive, children, wait_until
from workerkit import REPO, committed, small_fasta

import embedjob
from embedjob import layout
from embedjob.store import Store, open_store

N = 8


@pytest.fixture(scope="module")
def fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fasta(tmp_path_factory.mktemp("in") / "in.fa", N)


class Runner:
    """``embedjob run`` as a process; its stderr collected line by line as it comes."""

    def __init__(self, job: Path, *args: str, failpoints: str = "") -> None:
        # Two attempts per request: each failed call takes about a second, not botocore's
        # default eight attempts with backoff, so the test sees several outage lines quickly.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBEDJOB_FAILPOINTS": failpoints,
               "AWS_MAX_ATTEMPTS": "2"}
        self.proc = subprocess.Popen([sys.executable, "-m", "embedjob.cli", "run", str(job),
                                      *args], cwd=REPO, text=True, stderr=subprocess.PIPE,
                                     env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=HANG_GUARD)
        self._reader.join(timeout=10)
        return code, "\n".join(self.lines)


def s3_job(tmp_path: Path, fasta: Path, proxied, **extra) -> Path:
    spec = small_spec(fasta, proxied.uri("out/"), shards=1, storage={
        "endpointUrl": proxied.endpoint}, checkpoint={"everySequences": 2,
                                                      "shutdownDeadlineSeconds": 3},
        model={"maxTokensPerBatch": 512}, **extra)
    return write_job(tmp_path, spec)


def exactly_once(store: Store) -> None:
    status = json.loads(store.read_bytes(layout.STATUS))
    assert status["phase"] == "Succeeded", status
    with embedjob.open(store.uri, store.storage) as emb:
        assert len(emb) == N and len(set(emb.ids)) == N


def test_an_s3_outage_shorter_than_the_patience_is_ridden_out(
    fasta: Path, tmp_path: Path, s3_proxied, s3_bucket
) -> None:
    direct = open_store(s3_bucket.uri("out/"), s3_bucket.storage)  # moto itself, no proxy
    runner = Runner(s3_job(tmp_path, fasta, s3_proxied), "--storage-patience", "300",
                    failpoints="stall:batch=2,seconds=4")
    wait_until(lambda: committed(direct) > 0 or runner.proc.poll() is not None, "a commit")
    s3_proxied.proxy.outage("503")
    wait_until(lambda: runner.count("storage unavailable (") >= 2
               or runner.proc.poll() is not None, "two failed status writes", HANG_GUARD)
    s3_proxied.proxy.end_outage()
    code, err = runner.finish()
    assert code == 0, err
    assert "Traceback" not in err
    assert runner.count("storage unavailable (") >= 2 and "retrying in" in err, err
    assert "storage is back after" in err, err
    assert s3_proxied.proxy.counts["503"] > 0
    exactly_once(direct)


def test_an_s3_outage_past_the_patience_stops_the_workers_and_a_rerun_completes(
    fasta: Path, tmp_path: Path, s3_proxied, s3_bucket
) -> None:
    direct = open_store(s3_bucket.uri("out/"), s3_bucket.storage)
    job = s3_job(tmp_path, fasta, s3_proxied)
    runner = Runner(job, "--storage-patience", "5", failpoints="stall:batch=3,seconds=600")
    wait_until(lambda: committed(direct) > 0 or runner.proc.poll() is not None, "a commit")
    workers = children(runner.proc.pid)
    saved = committed(direct)
    assert workers and saved > 0 and runner.proc.poll() is None
    s3_proxied.proxy.outage("reset")  # connections closed: the endpoint is down
    code, err = runner.finish()
    assert code == 75, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("embedjob: error:")]
    assert len(errors) == 1 and "storage unavailable for" in errors[0], err
    assert runner.count('"message":"storage unavailable for') == 1, err  # one event line
    assert not any(alive(w) for w in workers), "workers outlived their runner"
    s3_proxied.proxy.end_outage()
    assert committed(direct) >= saved  # what was committed before the outage is kept
    again = Runner(job)
    code, err = again.finish()
    assert code == 0, err
    exactly_once(direct)
