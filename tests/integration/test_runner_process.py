"""``embedjob run`` as a process: signals, a killed runner, a second runner, a slow worker,
its own storage going away. Real runner and worker processes, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_local_run import one_line_error, run_cli, small_spec, status, write_job
from workerkit import REPO, small_fasta

import embedjob

HANG_GUARD = 120  # seconds: only so that a regression fails instead of hanging the suite


@pytest.fixture(scope="module")
def fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fasta(tmp_path_factory.mktemp("in") / "in.fa", 8)


def start_run(job: Path, *args: str, failpoints: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBEDJOB_FAILPOINTS": failpoints}
    return subprocess.Popen([sys.executable, "-m", "embedjob.cli", "run", str(job), *args],
                            cwd=REPO, text=True, stderr=subprocess.PIPE, env=env)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def wait_until(check, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def committed(out: Path) -> int:
    try:
        return int(json.loads((out / "shards/00000/progress.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def complete(out: Path, count: int) -> None:
    with embedjob.open(str(out)) as emb:
        assert len(emb) == count and len(set(emb.ids)) == count


def test_sigterm_while_indexing_exits_143_with_one_line(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1))
    proc = start_run(job, failpoints="stall:stage=indexing,seconds=600")
    wait_until(lambda: (out / ".embedjob.lock").exists() and
               (out / ".embedjob.lock").read_text().strip(), "the lease")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("embedjob: interrupted while indexing the input; "
                                            "nothing is lost: run again to continue")


def test_killed_runner_takes_its_workers_along_and_holds_the_output_alone(
    fasta: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = small_spec(fasta, out, shards=1, checkpoint={"everySequences": 2,
                                                         "shutdownDeadlineSeconds": 3},
                      model={"maxTokensPerBatch": 512})
    job = write_job(tmp_path, spec)
    runner = start_run(job, failpoints="stall:batch=3,seconds=600")
    wait_until(lambda: committed(out) > 0 or runner.poll() is not None, "a commit")
    workers = children(runner.pid)
    assert workers and runner.poll() is None
    # A second runner on the same output is refused, naming the first.
    second = run_cli("run", str(job))
    line = one_line_error(second)
    assert second.returncode == 75 and f"pid {runner.pid} on " in line and "in use" in line
    runner.kill()  # kill -9: no handler runs in the runner
    runner.communicate(timeout=HANG_GUARD)
    # Its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG), save and exit.
    wait_until(lambda: not any(alive(w) for w in workers), "the workers to exit", HANG_GUARD)
    saved = committed(out)
    assert saved > 0
    again = run_cli("run", str(job))  # the lease died with the runner
    assert again.returncode == 0, again.stderr
    complete(out, 8)


def test_a_slow_but_moving_worker_is_never_replaced(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = small_spec(fasta, out, shards=1, checkpoint={"everySeconds": 1},
                      model={"maxTokensPerBatch": 512})
    job = write_job(tmp_path, spec)
    # A first slow batch (4 s) teaches the runner the pace; a later one of 15 s is beyond the
    # 9 s floor but within 5 x the slowest pass seen, so the worker is left alone.
    result = run_cli("run", str(job), "--stuck-after", "9", env={
        "EMBEDJOB_FAILPOINTS": "stall:batch=0,seconds=4;stall:batch=2,seconds=15"})
    assert result.returncode == 0, result.stderr
    assert "stuck" not in result.stderr
    assert "attempt 1" not in result.stderr
    complete(out, 8)


def block_status(out: Path) -> None:
    """status.json becomes a directory: every write of it fails, as on a dead store."""
    (out / "status.json").unlink(missing_ok=True)
    (out / "status.json").mkdir()


def test_a_status_outage_is_ridden_out(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1))
    out.mkdir()
    block_status(out)
    runner = start_run(job, failpoints="stall:batch=1,seconds=6")
    wait_until(lambda: committed(out) > 0 or runner.poll() is not None, "a commit")
    assert runner.poll() is None, "the runner ended on a failed status write"
    (out / "status.json").rmdir()
    _, err = runner.communicate(timeout=300)
    assert runner.returncode == 0, err
    assert "storage unavailable" in err and "storage is back after" in err
    assert status(out)["phase"] == "Succeeded"
    complete(out, 8)


def test_a_long_outage_stops_the_workers_then_the_runner(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1,
                                         checkpoint={"shutdownDeadlineSeconds": 3}))
    out.mkdir()
    block_status(out)
    runner = start_run(job, "--storage-patience", "5", failpoints="stall:batch=1,seconds=600")
    seen: set[int] = set()

    def worker_started() -> bool:
        seen.update(children(runner.pid))
        return bool(seen) or runner.poll() is not None

    wait_until(worker_started, "a worker")
    _, err = runner.communicate(timeout=HANG_GUARD)
    assert runner.returncode == 75, err
    errors = [ln for ln in err.splitlines() if ln.startswith("embedjob: error:")]
    assert len(errors) == 1 and "storage unavailable for" in errors[0], err
    assert "Traceback" not in err
    assert seen and not any(alive(w) for w in seen), "workers outlived their runner"


def test_sigterm_saves_exits_143_and_a_rerun_resumes(fasta: Path, tmp_path: Path) -> None:
    # SIGINT (130) is tested in test_local_run.py; SIGTERM is what `kill` and systemd send.
    sig = signal.SIGTERM
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1, checkpoint={"everySequences": 2},
                                         model={"maxTokensPerBatch": 512}))
    runner = start_run(job, failpoints="stall:batch=3,seconds=30")
    wait_until(lambda: committed(out) > 0 or runner.poll() is not None, "a commit")
    runner.send_signal(sig)
    _, err = runner.communicate(timeout=HANG_GUARD)
    assert runner.returncode == 128 + sig, err
    assert status(out)["phase"] == "Suspended" and committed(out) > 0
    resumed = run_cli("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    complete(out, 8)


def test_retry_failed_then_restart(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1, retry={"quarantine": False,
                                                                       "cudaError": 1}))
    failed = run_cli("run", str(job), env={"EMBEDJOB_FAILPOINTS": "cuda_error:batch=0"})
    assert failed.returncode == 1 and status(out)["phase"] == "Failed"
    refused = run_cli("run", str(job))
    line = one_line_error(refused)
    assert "--retry-failed" in line and "--restart" in line and "shard 0" in line
    retried = run_cli("run", str(job), "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    complete(out, 8)
    before = (out / "manifest.json").stat().st_mtime_ns
    restarted = run_cli("run", str(job), "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert "restart: deleted" in restarted.stderr
    assert (out / "manifest.json").stat().st_mtime_ns != before
    complete(out, 8)
    shutil.rmtree(out)
