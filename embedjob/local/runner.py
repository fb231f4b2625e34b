"""``embedjob run job.yaml``: the same job on one machine, worker processes instead of pods.

The runner owns its output (a lease, see :mod:`embedjob.local.lease`), its workers die with
it (PR_SET_PDEATHSIG), it judges them stuck only from their heartbeat
(:mod:`embedjob.liveness`), and it rides out a storage outage of minutes
(:mod:`embedjob.local.patience`) before stopping its workers and saying so in one line.
"""

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
from dataclasses import dataclass, field
from pathlib import Path

from embedjob import layout
from embedjob.attempts import Ended, attempt_env, from_process
from embedjob.failures import EmbedjobError, FailureType, StorageError, TransientStorageError
from embedjob.liveness import DEFAULT_STUCK_AFTER, Beat, beat_interval, seen, verdict
from embedjob.local.lease import Lease, OutputInUse
from embedjob.local.patience import DEFAULT_OUTAGE_SECONDS, Patience
from embedjob.local.procs import default_workers, die_with_parent, stop_all
from embedjob.local.restart import discard, plan_restore, previous_status
from embedjob.local.scheduler import Shard, ready, record, start, status_of
from embedjob.local.view import View, index_notes, plural
from embedjob.logs import log
from embedjob.progress import parse_heartbeat, parse_progress
from embedjob.repair import check_and_reset
from embedjob.spec import EmbeddingJob, EmbeddingJobStatus, Phase, ShardState
from embedjob.status import dump_status
from embedjob.store import Store, open_store
from embedjob.times import from_epoch
from embedjob.worker.failpoints import Failpoints
from embedjob.worker.index import run_index

POLL_SECONDS = 0.2
PROGRESS_SECONDS = 2.0


@dataclass(frozen=True)
class RunOptions:
    workers: int | None = None
    stuck_after: float = DEFAULT_STUCK_AFTER
    storage_patience: float = DEFAULT_OUTAGE_SECONDS
    restart: bool = False
    retry_failed: bool = False
    verify: bool = False  # finished shards: checksums too, not only sizes and done records


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the worker loop (indexing, finalizing): leave at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Running:
    shard: Shard
    proc: subprocess.Popen[bytes]
    attempt: int
    termination_log: Path
    committed_before: int
    slot: int
    beat: Beat = field(default_factory=Beat)
    stuck: str = ""
    """Why the runner judged it stuck and killed it (empty: not stuck)."""


class LocalRun:
    def __init__(self, job: EmbeddingJob, options: RunOptions, view: View) -> None:
        self.job, self.spec, self.view, self.options = job, job.spec, view, options
        self.store: Store = open_store(self.spec.output.uri, self.spec.storage)
        self.running: dict[int, Running] = {}
        self.stopping = False
        self.stop_signal = signal.SIGINT
        self.step = "starting"
        self.patience = Patience(options.storage_patience)
        self.gave_up = ""
        self.beat_interval = beat_interval(self.store.uri)
        self.lease = Lease(self.store)
        self.tmp = Path(tempfile.mkdtemp(prefix="embedjob-run-"))
        self.status = EmbeddingJobStatus()
        """The last status written: its conditions keep their transition times."""

    # --- lifecycle
    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self.step = "taking the lease on the output"
            self.lease.acquire()
            return self._run()
        except Interrupted as stop:
            self.view.stop()
            print(f"embedjob: interrupted while {self.step}; nothing is lost: run again to "
                  "continue", file=sys.stderr)
            return 128 + stop.signum
        finally:
            stop_all([r.proc for r in self.running.values()],
                     self.spec.checkpoint.shutdown_deadline_seconds + 10)
            self.lease.release()

    def _run(self) -> int:
        name = self.job.metadata.name
        if self.options.restart:
            self.step = "discarding the earlier run"
            self.view.message(discard(self.store))
        self.step = "indexing the input"
        Failpoints.from_env(-1, -1).at("stage", "indexing")  # tests: a slow index
        summary = run_index(self.spec, self.store, job_name=name)
        for note in index_notes(summary, self.store.uri):
            self.view.message(note)
        self.step = "checking the output"
        for line in check_and_reset(self.store, summary.shards, verify=self.options.verify):
            self.view.message(line)  # a damaged shard is embedded again, not called complete
        if self.store.exists(layout.MANIFEST):
            from embedjob.worker.finalize import finalize

            finalize(self.spec, name)  # adds the merged file when output.merge was turned on
            self.view.message(f"job {name} is already complete: output in {self.store.uri}")
            return 0
        shards = self._restore([Shard(k, total=n) for k, n in enumerate(summary.shard_sequences)])
        cap = min(len(shards), self.spec.effective_parallelism)
        workers, gpus, threads = default_workers(cap)
        workers = min(self.options.workers or workers, cap)
        self.view.start(name, shards, workers)
        self.step = "embedding"
        try:
            phase, message = self._loop(shards, workers, gpus, threads)
        finally:
            self.step = "stopping the workers"
            self.view.update(shards)  # the last frame shows the final state
            self.view.stop()
        if self.gave_up:
            raise TransientStorageError(self.gave_up) if "storage" in self.gave_up else (
                OutputInUse(self.gave_up))
        if phase == Phase.running:  # all shards finished: write the outputs
            self.step = "writing the manifest"
            self._save_status(shards, Phase.merging, "writing the manifest")
            from embedjob.worker.finalize import finalize

            manifest = finalize(self.spec, name)
            phase = Phase.succeeded
            message = f"{plural(manifest['sequences'], 'sequence')} embedded"
        self._save_status(shards, phase, message)
        self.view.message(f"{phase.value}: {message} — output: {self.store.uri}")
        if phase == Phase.succeeded:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return 0
        self.view.message(f"worker logs: {self.tmp}")
        return 128 + self.stop_signal if phase == Phase.suspended else 1

    def _restore(self, shards: list[Shard]) -> list[Shard]:
        """Done shards, and attempt numbers and budgets carried over from an earlier run."""
        for s in shards:
            if self.store.exists(layout.shard_done(s.index)):
                s.state, s.done = ShardState.succeeded, s.total
        return plan_restore(shards, previous_status(self.store), self.options.retry_failed)

    def _loop(
        self, shards: list[Shard], workers: int, gpus: int, threads: int
    ) -> tuple[Phase, str]:
        last_progress = 0.0
        while True:
            now = time.time()
            self._reap(shards, now)
            if self.stopping:
                if not self.running:
                    return Phase.suspended, self.gave_up or "interrupted; run again to resume"
            elif any(s.state == ShardState.failed for s in shards):
                if not self.running:
                    failed = next(s for s in shards if s.state == ShardState.failed)
                    return Phase.failed, f"shard {failed.index} failed: {failed.reason}"
            else:
                if self.patience.since is None:  # no new workers while the store is away
                    for shard in ready(shards, now, workers - len(self.running)):
                        self._launch(shard, gpus, threads)
                if all(s.state == ShardState.succeeded for s in shards):
                    return Phase.running, ""
            if now - last_progress >= PROGRESS_SECONDS:
                self._read_progress()
                self._status_tick(shards)
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
            **attempt_env(self.spec, self.job.metadata.name, shard.index, attempt,
                          shard.history, str(tlog)),
            "EMBEDJOB_HEARTBEAT_SECONDS": str(self.beat_interval),
            # A user's own OMP_NUM_THREADS wins over the runner's split of the cores.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(threads),
        }
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        log_file = open(self.tmp / f"{shard.index:05d}-{attempt}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedjob.cli", "worker"], env=env,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent(),  # only prctl: nothing that takes a lock
        )
        log_file.close()
        now = time.time()
        self.running[shard.index] = Running(shard, proc, attempt, tlog, shard.done, slot,
                                            beat=Beat(seen_at=now, stage_since=now))
        shard.in_flight, shard.rate, shard.stage = 0, 0.0, "starting"
        self.view.event(f"shard {shard.index}: attempt {attempt} started")

    def _reap(self, shards: list[Shard], now: float) -> None:
        for index, run in list(self.running.items()):
            code = run.proc.poll()
            if code is None:
                continue
            del self.running[index]
            self._read_progress_of(run.shard)
            run.shard.in_flight, run.shard.rate, run.shard.stage = 0, 0.0, ""
            ended = self._ended(run, code, now)
            if ended.failure is not None and self.stopping:
                run.shard.state = ShardState.pending
                continue
            if self._outage_spares(run.shard, ended, now):
                continue
            settled = record(self.spec, run.shard, ended, now)
            if settled.decision is None:
                self.view.event(f"shard {index}: done")
                continue
            kind = settled.failure_type.value if settled.failure_type else ""
            decision = "failed" if settled.state == ShardState.failed else "retry"
            self.view.event(f"shard {index}: {kind.replace('_', ' ')} — {decision}: "
                            f"{settled.reason}")
            log("shard.failure", shard=index, type=kind, decision=decision,
                reason=settled.reason)

    def _ended(self, run: Running, code: int, now: float) -> Ended:
        """How the process ended, read once (the shared core's record of it)."""
        text = run.termination_log.read_text() if run.termination_log.exists() else ""
        published = code != 0 and self._exists(layout.shard_done(run.shard.index))
        ended = from_process(run.attempt, code, text, finished=from_epoch(now),
                             start_done=run.committed_before, seen_done=run.shard.done,
                             published=published, stuck=run.stuck,
                             log_tail=self._log_tail(run))
        run.shard.done = max(run.shard.done, ended.committed)
        return ended

    def _outage_spares(self, shard: Shard, ended: Ended, now: float) -> bool:
        """A worker's storage failure while the runner sees the store down itself is the
        outage's, not the shard's: wait for the store, spend no retry budget."""
        failure = ended.failure
        if failure is None or failure.type != FailureType.storage_error or not failure.transient:
            return False
        if self.patience.since is None:
            return False
        shard.state, shard.not_before = ShardState.backoff, self.patience.next_try
        self.view.event(f"shard {shard.index}: waiting for the storage to come back")
        return True

    def _exists(self, key: str) -> bool:
        try:
            return self.store.exists(key)
        except StorageError:
            return False

    def _log_tail(self, run: Running) -> str:
        path = self.tmp / f"{run.shard.index:05d}-{run.attempt}.log"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return lines[-1] if lines else ""

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.step != "embedding":
            raise Interrupted(signum)
        if self.stopping:
            return
        self.stop_signal = signum
        self._stop_workers("stopping: workers are saving their progress")

    def _stop_workers(self, why: str) -> None:
        self.stopping = True
        self.view.event(why)
        for run in self.running.values():
            run.proc.send_signal(signal.SIGTERM)

    # --- progress, liveness and status
    def _read_progress_of(self, shard: Shard) -> None:
        try:
            record = parse_progress(shard.index,
                                    self.store.read_bytes(layout.shard_progress(shard.index)))
        except EmbedjobError:
            return
        if record is not None:
            shard.done = max(shard.done, record.done)

    def _read_heartbeat(self, run: Running, now: float) -> None:
        try:
            doc = parse_heartbeat(self.store.read_bytes(layout.shard_heartbeat(run.shard.index)))
        except EmbedjobError:
            return
        if doc is None or doc.attempt != run.attempt:
            return  # an earlier attempt's beat says nothing about this one
        # The same fold as the operator's (liveness.seen): times on the runner's clock.
        run.beat = seen(run.beat, now, value=doc.beat, stage=doc.stage,
                        slowest_pass=doc.slowest_pass)
        s = run.shard
        s.in_flight = max(0, doc.in_flight_total - s.done)
        s.rate, s.stage, s.resumed_at = doc.rate, doc.stage, doc.committed_at_start

    def _read_progress(self) -> None:
        now = time.time()
        for run in self.running.values():
            self._read_progress_of(run.shard)
            self._read_heartbeat(run, now)
            if run.stuck:
                continue
            judged = verdict(run.beat, now, stuck_after=self.options.stuck_after,
                             beat_interval=self.beat_interval)
            if judged.stuck:
                run.stuck = judged.reason
                self.view.event(f"shard {run.shard.index}: stuck ({judged.reason}); "
                                "replacing the worker")
                run.proc.kill()

    def _status_tick(self, shards: list[Shard]) -> None:
        """Save status.json and renew the lease; ride out a storage outage meanwhile."""
        now = time.monotonic()
        if self.gave_up or not self.patience.due(now):
            return
        try:
            self._write_status(shards, Phase.running)
            self.lease.renew_if_due()
        except OutputInUse as err:
            self.gave_up = f"lost the output to another run: {err.message}"
            self._stop_workers(self.gave_up)
            return
        except StorageError as err:
            give_up, line = self.patience.failed(now, err.message)
            if give_up:
                self.gave_up = line
                self._stop_workers(line)  # which says the line, once
            else:
                self.view.event(line)
            return
        back = self.patience.succeeded(now)
        if back:
            self.view.event(back)

    def _save_status(self, shards: list[Shard], phase: Phase, message: str = "") -> None:
        """A status write that must land (the final phase): wait out an outage, within
        patience."""
        while True:
            now = time.monotonic()
            try:
                self._write_status(shards, phase, message)
            except StorageError as err:
                give_up, line = self.patience.failed(now, err.message)
                self.view.message(line)
                if give_up:
                    raise TransientStorageError(line) from None
                time.sleep(max(0.0, self.patience.next_try - time.monotonic()))
                continue
            back = self.patience.succeeded(now)
            if back:
                self.view.message(back)
            return

    def _write_status(self, shards: list[Shard], phase: Phase, message: str = "") -> None:
        status = status_of(shards, phase, message, job=self.job.metadata.name, old=self.status)
        self.store.write_bytes(layout.STATUS, json.dumps(dump_status(status), indent=1).encode())
        self.status = status


def run_job(job: EmbeddingJob, options: RunOptions | None = None) -> int:
    return LocalRun(job, options or RunOptions(), View.for_terminal()).run()
