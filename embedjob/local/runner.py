"""``embedjob run job.yaml``: the same job on one machine, worker processes instead of pods."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from embedjob import layout
from embedjob.failures import (
    EmbedjobError,
    Failure,
    FailureType,
    TerminationMessage,
    classify_exit,
)
from embedjob.local.scheduler import Outcome, Shard, finish, ready, start, status_of
from embedjob.local.view import View
from embedjob.logs import log
from embedjob.policy import worker_env
from embedjob.repair import check_and_reset
from embedjob.spec import EmbeddingJob, Phase, ShardState, dump_spec
from embedjob.store import Store, open_store
from embedjob.worker.index import run_index

POLL_SECONDS = 0.2
PROGRESS_SECONDS = 2.0
STUCK_INTERVALS = 3
"""A worker whose progress.json has not moved for this many checkpoint intervals is stuck."""
LOAD_GRACE_SECONDS = 900.0
"""How long a worker may take before its first heartbeat (downloading and loading a 15B model)."""


def default_workers(shards: int) -> tuple[int, int, int]:
    """(workers, GPUs, threads per worker): one per GPU, else a split of the cores."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus:
        return min(gpus, shards), gpus, max(1, (os.cpu_count() or 1) // gpus)
    cores = os.cpu_count() or 1
    threads = 4 if cores >= 8 else cores
    return max(1, min(shards, cores // threads)), 0, threads


@dataclass
class Running:
    shard: Shard
    proc: subprocess.Popen[bytes]
    attempt: int
    termination_log: Path
    committed_before: int
    slot: int
    started: float
    heartbeat: str = ""
    heartbeat_at: float = 0.0
    stuck: bool = False

    def stalled(self, now: float, interval: float) -> bool:
        """No heartbeat yet after the load grace, or none for STUCK_INTERVALS intervals."""
        if not self.heartbeat_at:
            return now - self.started > LOAD_GRACE_SECONDS
        return now - self.heartbeat_at > STUCK_INTERVALS * interval


class LocalRun:
    def __init__(self, job: EmbeddingJob, workers: int | None, view: View) -> None:
        self.job, self.spec, self.view = job, job.spec, view
        self.store: Store = open_store(self.spec.output.uri, self.spec.storage)
        self.requested_workers = workers
        self.running: dict[int, Running] = {}
        self.stopping = False
        self.tmp = Path(tempfile.mkdtemp(prefix="embedjob-run-"))

    # --- lifecycle
    def run(self) -> int:
        name = self.job.metadata.name
        summary = run_index(self.spec, self.store, job_name=name)
        for line in check_and_reset(self.store, summary.shards):
            self.view.message(line)  # a damaged shard is embedded again, not called complete
        if self.store.exists(layout.MANIFEST):
            from embedjob.worker.finalize import finalize

            finalize(self.spec, name)  # adds the merged file when output.merge was turned on
            self.view.message(f"job {name} is already complete: output in {self.store.uri}")
            return 0
        shards = self._restore([Shard(k, total=n) for k, n in enumerate(summary.shard_sequences)])
        cap = min(len(shards), self.spec.effective_parallelism)
        workers, gpus, threads = default_workers(cap)
        workers = min(self.requested_workers or workers, cap)
        self.view.start(name, shards, workers)
        signal.signal(signal.SIGINT, self._interrupt)
        signal.signal(signal.SIGTERM, self._interrupt)
        try:
            phase, message = self._loop(shards, workers, gpus, threads)
        finally:
            self.view.update(shards)  # the last frame shows the final state
            self.view.stop()
        if phase == Phase.running:  # all shards finished: write the outputs
            self._write_status(shards, Phase.merging, "writing the manifest")
            from embedjob.worker.finalize import finalize

            manifest = finalize(self.spec, name)
            phase, message = Phase.succeeded, f"{manifest['sequences']} sequences embedded"
        self._write_status(shards, phase, message)
        self.view.message(f"{phase.value}: {message} — output: {self.store.uri}")
        if phase == Phase.succeeded:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.view.message(f"worker logs: {self.tmp}")
        return {Phase.succeeded: 0, Phase.suspended: 130}.get(phase, 1)

    def _restore(self, shards: list[Shard]) -> list[Shard]:
        """Continue attempt numbers from an earlier run, so part names never collide."""
        for s in shards:
            if self.store.exists(layout.shard_done(s.index)):
                s.state, s.done = ShardState.succeeded, s.total
        if not self.store.exists(layout.STATUS):
            return shards
        try:
            previous = json.loads(self.store.read_bytes(layout.STATUS))
        except (ValueError, EmbedjobError):
            return shards
        for entry in previous.get("manifest", []):
            k = entry.get("shard")
            if isinstance(k, int) and 0 <= k < len(shards):
                s = shards[k]
                s.history = replace(s.history, attempts=int(entry.get("attempt", 0)) + 1)
        return shards

    def _loop(
        self, shards: list[Shard], workers: int, gpus: int, threads: int
    ) -> tuple[Phase, str]:
        last_progress = 0.0
        while True:
            now = time.time()
            self._reap(shards, now)
            if self.stopping:
                if not self.running:
                    return Phase.suspended, "interrupted; run again to resume"
            elif any(s.state == ShardState.failed for s in shards):
                if not self.running:
                    failed = next(s for s in shards if s.state == ShardState.failed)
                    return Phase.failed, f"shard {failed.index} failed: {failed.reason}"
            else:
                for shard in ready(shards, now, workers - len(self.running)):
                    self._launch(shard, gpus, threads)
                if all(s.state == ShardState.succeeded for s in shards):
                    return Phase.running, ""
            if now - last_progress >= PROGRESS_SECONDS:
                self._read_progress()
                self._write_status(shards, Phase.running)
                self.view.update(shards)
                last_progress = now
            time.sleep(POLL_SECONDS)

    # --- processes
    def _launch(self, shard: Shard, gpus: int, threads: int) -> None:
        attempt = start(shard)
        used = {r.slot for r in self.running.values()}
        slot = next(i for i in itertools.count() if i not in used)  # one GPU per slot
        tlog = self.tmp / f"{shard.index:05d}-{attempt}.termination"
        env = {
            **os.environ,
            "EMBEDJOB_SPEC": json.dumps(dump_spec(self.spec)),
            "EMBEDJOB_JOB": self.job.metadata.name,
            "EMBEDJOB_SHARD": str(shard.index),
            "EMBEDJOB_ATTEMPT": str(attempt),
            "EMBEDJOB_TERMINATION_LOG": str(tlog),
            "OMP_NUM_THREADS": str(threads),
            **worker_env(shard.history),
        }
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        log_file = open(self.tmp / f"{shard.index:05d}-{attempt}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedjob.cli", "worker"], env=env,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log_file.close()
        self.running[shard.index] = Running(shard, proc, attempt, tlog, shard.done, slot,
                                            started=time.time())
        self.view.event(f"shard {shard.index}: attempt {attempt} started")

    def _reap(self, shards: list[Shard], now: float) -> None:
        for index, run in list(self.running.items()):
            code = run.proc.poll()
            if code is None:
                continue
            del self.running[index]
            self._read_progress_of(run.shard)
            failure = None
            if code != 0 and self.store.exists(layout.shard_done(index)):
                code = 0  # it published the shard, then a signal cut its exit short
            if code == 0:
                pass
            elif run.stuck:
                interval = self.spec.checkpoint.every_seconds
                failure = Failure(FailureType.stuck,
                                  f"no progress for {STUCK_INTERVALS} checkpoint intervals "
                                  f"({STUCK_INTERVALS * interval:.0f}s); worker replaced")
            elif code != 0:
                text = run.termination_log.read_text() if run.termination_log.exists() else ""
                message = TerminationMessage.from_json(text)
                failure = classify_exit(code, message)
                if message is None:
                    failure = replace(failure, message=self._log_tail(run))
                else:
                    run.shard.done = max(run.shard.done, message.committed)
            progressed = run.shard.done > run.committed_before
            if self.stopping and failure is not None:
                run.shard.state = ShardState.pending
                continue
            outcome, reason = finish(self.spec, run.shard, failure, progressed, now)
            if outcome is Outcome.succeeded:
                self.view.event(f"shard {index}: done")
            else:
                kind = failure.type.value if failure else ""
                self.view.event(f"shard {index}: {kind} — {outcome.value}: {reason}")
                log("shard.failure", shard=index, type=kind, decision=outcome.value, reason=reason)

    def _log_tail(self, run: Running) -> str:
        path = self.tmp / f"{run.shard.index:05d}-{run.attempt}.log"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        last = lines[-1] if lines else ""
        return f"worker exited with code {run.proc.returncode}: {last[-300:]}"

    def _interrupt(self, signum: int, _frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.view.event("stopping: workers are saving their progress")
        for run in self.running.values():
            run.proc.send_signal(signal.SIGTERM)

    # --- progress and status
    def _read_progress_of(self, shard: Shard) -> dict[str, object] | None:
        try:
            doc = json.loads(self.store.read_bytes(layout.shard_progress(shard.index)))
        except (EmbedjobError, ValueError):
            return None
        shard.done, shard.rate = int(doc.get("done", shard.done)), float(doc.get("rate", 0.0))
        return doc

    def _read_progress(self) -> None:
        now = time.time()
        for run in self.running.values():
            doc = self._read_progress_of(run.shard)
            beat = f"{doc.get('updated')}/{doc.get('done')}" if doc else ""
            if doc and doc.get("attempt") == run.attempt and beat != run.heartbeat:
                run.heartbeat, run.heartbeat_at = beat, now
            if not run.stuck and run.stalled(now, self.spec.checkpoint.every_seconds):
                run.stuck = True
                self.view.event(f"shard {run.shard.index}: stuck, replacing the worker")
                run.proc.kill()

    def _write_status(self, shards: list[Shard], phase: Phase, message: str = "") -> None:
        status = status_of(shards, phase, message)
        data = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        self.store.write_bytes(layout.STATUS, json.dumps(data, indent=1).encode())


def run_job(job: EmbeddingJob, workers: int | None = None) -> int:
    return LocalRun(job, workers, View.for_terminal()).run()
