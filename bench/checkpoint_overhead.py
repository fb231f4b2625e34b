"""What checkpointing costs the worker, and what a SIGTERM or a SIGKILL costs the job.

Runs the real worker (``python -m embedjob.cli worker``) as a subprocess on one shard of
``examples/data/proteins.fa`` (esm2_t6_8M_UR50D, random weights, fp32, CPU):

(a) throughput of the embedding phase — from the worker's ``shard.start`` log line to its
    last ``checkpoint.committed`` line, so model loading is not timed — with checkpointing
    effectively off, at the default thresholds, and at aggressive ones; rounds interleaved,
    medians and paired per-round ratios reported;
(b) time from SIGTERM (at a random point, with a batch in flight) to the process's exit;
(c) sequences redone after a kill at a random batch, against the checkpoint interval.

    python bench/checkpoint_overhead.py [--n 300] [--store file|s3] [--rounds 3]

``--store s3`` starts moto's ThreadedMotoServer on loopback (as tests/conftest.py does) so
parts travel over real HTTP through boto3.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embedjob.spec import EmbeddingJobSpec, StorageSpec, dump_spec  # noqa: E402
from embedjob.store import open_store  # noqa: E402
from embedjob.worker.index import run_index  # noqa: E402

PROTEINS = REPO / "examples" / "data" / "proteins.fa"
OFF_SECONDS = 1e9


@dataclass(frozen=True)
class Setting:
    name: str
    every_sequences: int
    every_seconds: float
    target: str


@dataclass(frozen=True)
class Run:
    """One worker process: its exit code and its JSON log lines."""

    rc: int
    events: list[dict[str, Any]]
    message: dict[str, Any]

    def first(self, event: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == event), None)

    def all(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


# --- pure helpers -------------------------------------------------------------------------


def parse_events(text: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines (anything else, e.g. a warning, is skipped)."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            out.append(record)
    return out


def embed_seconds(run: Run) -> float:
    """Embedding phase: ``shard.start`` to the last committed part (final upload included)."""
    start, commits = run.first("shard.start"), run.all("checkpoint.committed")
    if start is None or not commits:
        raise RuntimeError(f"worker exited {run.rc} without an embedding phase: {run.message}")
    return max(c["ts"] for c in commits) - start["ts"]


def batch_sizes(run: Run) -> list[int]:
    """Sequences per batch, from a run that committed one part per batch (everySequences 1)."""
    parts = sorted((c["part"], c["sequences"]) for c in run.all("checkpoint.committed"))
    return [n for _, n in parts]


def median_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of this setting's time over the baseline's in the same round."""
    return statistics.median(t / b for t, b in zip(times[name], times[base], strict=True))


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


# --- the worker as a process --------------------------------------------------------------


@dataclass
class Bench:
    fasta: Path
    tmp: Path
    storage: StorageSpec
    uri_for: Callable[[str], str]
    max_tokens: int
    threads: int | None
    counter: int = 0

    def spec(self, out: str, every_sequences: int, every_seconds: float) -> EmbeddingJobSpec:
        return EmbeddingJobSpec.model_validate(
            {
                "input": {"uri": str(self.fasta)},
                "output": {"uri": out},
                "model": {
                    "name": "esm2_t6_8M_UR50D",
                    "weights": "random",
                    "precision": "fp32",
                    "maxTokensPerBatch": self.max_tokens,
                },
                "shards": 1,
                "checkpoint": {"everySequences": every_sequences, "everySeconds": every_seconds},
                "storage": self.storage.model_dump(by_alias=True, exclude_none=True),
            }
        )

    def fresh(self, every_sequences: int, every_seconds: float) -> EmbeddingJobSpec:
        """A new, indexed output location (each measured run starts from nothing)."""
        self.counter += 1
        spec = self.spec(self.uri_for(f"run-{self.counter:03d}"), every_sequences, every_seconds)
        run_index(spec, open_store(spec.output.uri, spec.storage))
        return spec

    def start(
        self, spec: EmbeddingJobSpec, attempt: int = 0, failpoints: str = ""
    ) -> tuple[subprocess.Popen[bytes], Path, Path]:
        stamp = f"{self.counter:03d}-{attempt}-{time.monotonic_ns()}"
        log, term = self.tmp / f"log-{stamp}", self.tmp / f"term-{stamp}"
        env = {
            **os.environ,
            "EMBEDJOB_SPEC": json.dumps(dump_spec(spec)),
            "EMBEDJOB_SHARD": "0",
            "EMBEDJOB_ATTEMPT": str(attempt),
            "EMBEDJOB_TERMINATION_LOG": str(term),
            "EMBEDJOB_WORKDIR": str(self.tmp),
        }
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if failpoints:
            env["EMBEDJOB_FAILPOINTS"] = failpoints
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "embedjob.cli", "worker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return proc, log, term

    @staticmethod
    def collect(proc: subprocess.Popen[bytes], log: Path, term: Path) -> Run:
        rc = proc.wait(timeout=900)
        text = term.read_text() if term.exists() else ""
        return Run(
            rc,
            parse_events(log.read_text(errors="replace")),
            json.loads(text) if text.strip() else {},
        )

    def run(self, spec: EmbeddingJobSpec, attempt: int = 0, failpoints: str = "") -> Run:
        return self.collect(*self.start(spec, attempt, failpoints))


def wait_for_event(
    log: Path, proc: subprocess.Popen[bytes], events: tuple[str, ...], timeout: float = 300
) -> dict[str, Any] | None:
    """Poll the worker's log until one of ``events`` appears (None if it exited first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in parse_events(log.read_text(errors="replace")) if e["event"] in events]
        if found:
            return found[0]
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    raise TimeoutError(f"no {events} from the worker in {timeout}s")


# --- (a) throughput -----------------------------------------------------------------------


def settings_for(n: int, aggressive: int) -> list[Setting]:
    return [
        Setting("off (everySequences > shard)", n * 10, OFF_SECONDS, "baseline"),
        Setting("default (10000 seq / 300 s)", 10000, 300, "<= 3 %"),
        Setting(f"aggressive ({aggressive} seq)", aggressive, 300, "(per-part cost)"),
        Setting("every batch (1 seq)", 1, 300, "(worst case)"),
    ]


def measure_throughput(
    b: Bench, n: int, rounds: int, aggressive: int
) -> tuple[str, list[int], float]:
    """The table, the batch sizes (from the every-batch run), the median embed time when off."""
    settings = settings_for(n, aggressive)
    times: dict[str, list[float]] = {s.name: [] for s in settings}
    parts: dict[str, int] = {}
    sizes: list[int] = []
    for r in range(rounds):
        # Rotate the order each round so no setting always runs first (warm caches, neighbours).
        order = settings[r % len(settings) :] + settings[: r % len(settings)]
        for s in order:
            run = b.run(b.fresh(s.every_sequences, s.every_seconds))
            if run.rc != 0:
                raise RuntimeError(f"{s.name}: worker exited {run.rc}: {run.message}")
            times[s.name].append(embed_seconds(run))
            parts[s.name] = len(run.all("checkpoint.committed"))
            if s.every_sequences == 1:
                sizes = batch_sizes(run)
            print(
                f"  round {r + 1} {s.name}: {times[s.name][-1]:.2f} s, {parts[s.name]} part(s)",
                file=sys.stderr,
                flush=True,
            )
    base = settings[0].name
    rows = []
    for s in settings:
        med = statistics.median(times[s.name])
        ratio = median_ratio(times, s.name, base)
        extra_parts = parts[s.name] - parts[base]
        per_part = (med - statistics.median(times[base])) / extra_parts if extra_parts else None
        rows.append(
            [
                s.name,
                str(parts[s.name]),
                f"{n / med:.2f}",
                "—" if s.name == base else f"{(ratio - 1) * 100:+.1f} %",
                "—" if per_part is None else f"{per_part * 1000:+.0f} ms",
                s.target,
                " ".join(f"{t:.2f}" for t in times[s.name]),
            ]
        )
    header = [
        "setting",
        "parts",
        "seq/s (median)",
        "overhead vs off",
        "per extra part",
        "target",
        "embed s per round",
    ]
    return table(header, rows), sizes, statistics.median(times[base])


# --- (b) SIGTERM --------------------------------------------------------------------------


def measure_sigterm(b: Bench, trials: int, rng: random.Random, embed_s: float) -> str:
    rows = []
    exits: list[float] = []
    for t in range(trials):
        spec = b.fresh(10000, 300)
        proc, log, term = b.start(spec)
        if wait_for_event(log, proc, ("shard.start",)) is None:
            raise RuntimeError("worker exited before shard.start")
        delay = rng.uniform(0.1, 0.8) * embed_s
        time.sleep(delay)
        if proc.poll() is not None:
            rows.append([str(t + 1), f"{delay:.1f}", "finished first", *[""] * 7])
            continue
        sent_wall, sent = time.time(), time.monotonic()
        proc.send_signal(signal.SIGTERM)
        run = b.collect(proc, log, term)
        took = time.monotonic() - sent
        exits.append(took)
        msg = run.message
        lost = int(msg.get("done_this_attempt", 0)) - int(msg.get("committed", 0))
        # Where the time went: the batch in flight, the final part, then process teardown.
        saved = max((c["ts"] for c in run.all("checkpoint.committed")), default=sent_wall)
        failed = run.first("worker.failed")
        cells = (t + 1, f"{delay:.1f}", f"{took:.2f}", f"{max(saved - sent_wall, 0):.2f}",
                 f"{(failed['ts'] if failed else saved) - saved:.2f}",
                 f"{took - ((failed['ts'] if failed else saved) - sent_wall):.2f}", run.rc,
                 msg.get("done_this_attempt", "?"), msg.get("committed", "?"), lost)
        rows.append([str(c) for c in cells])
    header = ["trial", "SIGTERM after start (s)", "signal→exit (s)", "→ last part committed",
              "→ worker.failed", "→ process gone", "exit code", "embedded this attempt",
              "committed", "lost"]
    summary = (
        f"signal→exit: median {statistics.median(exits):.2f} s, max {max(exits):.2f} s "
        f"over {len(exits)} trials (target: within 10 s, exit 143, 0 lost)"
        if exits
        else "no trial caught the worker mid-shard"
    )
    return table(header, rows) + "\n\n" + summary


# --- (c) kills ----------------------------------------------------------------------------


def resumed_count(b: Bench, spec: EmbeddingJobSpec) -> int:
    """What a new attempt finds committed: its own ``shard.resume``/``shard.start`` line."""
    proc, log, term = b.start(spec, attempt=1)
    event = wait_for_event(log, proc, ("shard.resume", "shard.start"))
    proc.send_signal(signal.SIGTERM)
    b.collect(proc, log, term)
    if event is None:
        raise RuntimeError("the resumed worker exited before reading the committed parts")
    return int(event["committed"])


KILL_POSITIONS = {
    # os._exit as the batch starts, right after the previous batch was buffered or its part
    # handed to an upload thread: the worst moment, that part may still be in flight.
    "at batch start": "die:batch={b},attempt=0,code=137",
    # The same kill 0.5 s into the next batch: where a random SIGKILL usually lands.
    "0.5 s into batch": "stall:batch={b},attempt=0,seconds=0.5;die:batch={b},attempt=0,code=137",
}


def measure_kills(
    b: Bench, sizes: list[int], intervals: list[int], trials: int, rng: random.Random
) -> str:
    rows = []
    for every, (where, points) in itertools.product(intervals, KILL_POSITIONS.items()):
        redone: list[int] = []
        for _ in range(trials):
            batch = rng.randrange(1, len(sizes))
            spec = b.fresh(every, 300)
            run = b.run(spec, failpoints=points.format(b=batch))
            if run.rc != 137:
                raise RuntimeError(f"expected the kill at batch {batch}, got exit {run.rc}")
            embedded = sum(sizes[:batch])
            logged = max((c["committed"] for c in run.all("checkpoint.committed")), default=0)
            committed = resumed_count(b, spec)
            redone.append(embedded - committed)
            cells = (every, where, batch, embedded, logged, committed, embedded - committed,
                     sizes[batch - 1])
            rows.append([str(c) for c in cells])
        print(f"  interval {every} {where}: redone {redone}", file=sys.stderr, flush=True)
    header = ["everySequences", "kill", "before batch", "embedded", "commits logged",
              "committed at resume", "redone", "last batch size"]
    return table(header, rows)


# --- stores -------------------------------------------------------------------------------


@contextmanager
def file_store(tmp: Path) -> Iterator[tuple[StorageSpec, Callable[[str], str]]]:
    yield StorageSpec(), lambda name: str(tmp / "out" / name)


@contextmanager
def s3_store(tmp: Path) -> Iterator[tuple[StorageSpec, Callable[[str], str]]]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    storage = StorageSpec(endpoint_url=f"http://{host}:{port}", region="us-east-1")
    try:
        from embedjob.store import s3_client

        s3_client(storage).create_bucket(Bucket="bench")
        yield storage, lambda name: f"s3://bench/{name}/"
    finally:
        server.stop()


def first_proteins(path: Path, n: int) -> Path:
    lines, seen = [], 0
    for line in PROTEINS.read_text().splitlines():
        if line.startswith(">"):
            seen += 1
            if seen > n:
                break
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="proteins in the shard (max 300)")
    ap.add_argument("--store", choices=("file", "s3"), default="file")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting")
    ap.add_argument("--aggressive", type=int, default=25, help="everySequences of the 3rd row")
    ap.add_argument("--max-tokens", type=int, default=16384, help="model.maxTokensPerBatch")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the worker")
    ap.add_argument("--sigterm-trials", type=int, default=5)
    ap.add_argument("--kill-trials", type=int, default=4, help="per checkpoint interval")
    ap.add_argument("--kill-intervals", default="25,100", help="everySequences values for (c)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fasta = first_proteins(tmp / "shard.fa", args.n)
        stores = {"file": file_store, "s3": s3_store}
        with stores[args.store](tmp) as (storage, uri_for):
            b = Bench(fasta, tmp, storage, uri_for, args.max_tokens, args.threads)
            print(
                f"store={args.store} n={args.n} maxTokensPerBatch={args.max_tokens} "
                f"threads={args.threads or 'torch default'} cores={os.cpu_count()}",
                flush=True,
            )
            sizes: list[int] = []
            if "a" not in skip:
                text, sizes, embed_s = measure_throughput(b, args.n, args.rounds, args.aggressive)
                print(
                    f"\n(a) throughput of the embedding phase, {args.rounds} interleaved "
                    f"rounds\n\n{text}\n",
                    flush=True,
                )
            if not sizes:
                probe = b.run(b.fresh(1, 300))
                sizes, embed_s = batch_sizes(probe), embed_seconds(probe)
            if "b" not in skip:
                print(
                    f"(b) SIGTERM at a random point (default thresholds)\n\n"
                    f"{measure_sigterm(b, args.sigterm_trials, rng, embed_s)}\n",
                    flush=True,
                )
            if "c" not in skip:
                intervals = [int(x) for x in args.kill_intervals.split(",")]
                print(
                    f"(c) kill (os._exit 137, as SIGKILL) at a random batch; {len(sizes)} "
                    f"batches of {min(sizes)} to {max(sizes)} sequences\n\n"
                    f"{measure_kills(b, sizes, intervals, args.kill_trials, rng)}\n",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
