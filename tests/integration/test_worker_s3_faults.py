"""Real workers on moto's S3 behind the fault-injecting proxy (tests/faultproxy.py): lost
responses, cut bodies, late writers, and the chaos suite (random storage faults plus
SIGTERM/SIGKILL at seeded random points): 0 lost, 0 duplicated, 0 orphans."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
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
    uninterrupted,
    wait_for_commits,
)

from embedjob import layout
from embedjob.failures import EXIT_PREEMPTED
from embedjob.store import Store

N = 48


@pytest.fixture(scope="module")
def fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fasta(tmp_path_factory.mktemp("in") / "in.fa", N)


@pytest.fixture(scope="module")
def reference(fasta: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """An uninterrupted run on local disk: what every faulty run must reproduce."""
    return uninterrupted(fasta, tmp_path_factory.mktemp("ref"))


def s3_spec(fasta: Path, bucket, prefix: str = "out/", **overrides):
    return make_spec(str(fasta), bucket.uri(prefix), storage={"endpointUrl": bucket.endpoint},
                     **overrides)


def leftovers(store: Store, shard: int = 0) -> list[str]:
    """Parts and commit records still there (orphans once the shard is published)."""
    return [*store.list(layout.shard_parts(shard)), *store.list(layout.shard_commits(shard))]


def check_exactly_once(store: Store, tmp: Path, reference: dict[str, np.ndarray]) -> dict:
    """Counts of lost, duplicated and differing rows and of orphans; all must be 0."""
    ids, emb = read_shard(store, tmp)
    differ = sum(
        not np.allclose(row, reference[i], rtol=1e-5, atol=1e-5)
        for i, row in zip(ids, emb, strict=True) if i in reference
    )
    counts = {"lost": len(set(reference) - set(ids)), "duplicated": len(ids) - len(set(ids)),
              "unexpected": len(set(ids) - set(reference)), "differing": differ,
              "orphans": len(leftovers(store))}
    return counts


def test_lost_response_to_a_part_put_does_not_fail_the_shard(
    fasta, reference, tmp_path, s3_proxied
) -> None:
    """The part lands, its response is lost, botocore retries into its own If-None-Match."""
    spec = s3_spec(fasta, s3_proxied)
    store = index(spec)
    s3_proxied.proxy.force("drop", method="PUT", contains="/parts/a0000-000001")
    s3_proxied.proxy.force("drop", method="PUT", contains="/commits/a0000-000002")
    worker = start_worker(spec, tmp_path)
    assert worker.wait() == 0, worker.output()
    assert s3_proxied.proxy.counts["drop"] == 2
    assert '"event":"storage.create_found_own"' in worker.output()
    assert '"event":"checkpoint.failed"' not in worker.output()  # nothing embedded twice
    assert check_exactly_once(store, tmp_path, reference) == dict.fromkeys(
        ("lost", "duplicated", "unexpected", "differing", "orphans"), 0)


def test_cut_bodies_during_resume_and_publish_are_retried(
    fasta, reference, tmp_path, s3_proxied
) -> None:
    spec = s3_spec(fasta, s3_proxied)
    store = index(spec)
    first = start_worker(spec, tmp_path, env={"EMBEDJOB_FAILPOINTS": "die:batch=4"})
    assert first.wait() == 137
    assert committed(store) > 0
    proxy = s3_proxied.proxy
    proxy.force("cut", times=2, method="GET", contains="/commits/")
    proxy.force("cut", times=4, method="GET", contains="/parts/")
    resumed = start_worker(spec, tmp_path, attempt=1)
    assert resumed.wait() == 0, resumed.output()
    assert proxy.counts["cut"] == 6
    assert resumed.output().count('"event":"storage.read_retry"') == 6
    assert '"event":"part.rejected"' not in resumed.output()
    assert check_exactly_once(store, tmp_path, reference)["lost"] == 0
    assert leftovers(store) == []


def test_late_writer_cleans_up_and_leaves_the_newer_report(
    fasta, reference, tmp_path, s3_proxied
) -> None:
    """An old attempt, frozen (SIGSTOP) while a newer one publishes the shard, resumes: its
    late parts and records are removed and progress.json keeps the newer attempt's report."""
    spec = s3_spec(fasta, s3_proxied)
    store = index(spec)
    old = start_worker(spec, tmp_path, attempt=0,
                       env={"EMBEDJOB_FAILPOINTS": "stall:seconds=0.3"})
    wait_for_commits(store, 8, old.proc)
    old.proc.send_signal(signal.SIGSTOP)
    try:
        new = start_worker(spec, tmp_path, attempt=1)
        assert new.wait() == 0, new.output()
    finally:
        old.proc.send_signal(signal.SIGCONT)
    assert old.wait() == 0, old.output()
    assert '"event":"shard.done_elsewhere"' in old.output()
    progress = store.read_bytes(layout.shard_progress(0))
    assert b'"attempt":1' in progress, progress
    assert leftovers(store) == []
    assert check_exactly_once(store, tmp_path, reference)["lost"] == 0


def stop_in(proc, seconds: float) -> None:
    """Let ``proc`` run up to ``seconds`` (it may finish first)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def chaos(fasta: Path, reference, tmp: Path, bucket, interruptions: int, seed: int) -> dict:
    """Workers interrupted at seeded random points (SIGTERM or SIGKILL; after a random number
    of new commits, or after a random time, which lands in start-up, model load, resume,
    embedding or publish) while 20 % of storage requests fail, stall, lose their response or
    have their body cut. A published shard is reset and embedded again, so interruptions keep
    landing on real work; a last worker finishes the shard."""
    rng = random.Random(seed)
    proxy = bucket.proxy
    proxy.delay = (0.05, 0.5)
    spec = s3_spec(fasta, bucket, checkpoint={"everySequences": 4})
    store = index(spec)
    proxy.set_rate(0.2)
    kinds = {"SIGTERM": 0, "SIGKILL": 0, "after_commits": 0, "at_random_time": 0, "publishes": 0}
    attempt = 0
    while kinds["SIGTERM"] + kinds["SIGKILL"] < interruptions:
        if store.exists(layout.shard_done(0)):  # published: embed the shard again
            kinds["publishes"] += 1
            for key in (layout.shard_done(0), layout.shard_output(0), layout.shard_progress(0)):
                store.delete(key)
        worker = start_worker(spec, tmp, attempt=attempt)
        before = committed(store)
        if before < N - 1 and rng.random() < 0.6:
            wait_for_commits(store, min(before + rng.randint(1, 8), N - 1), worker.proc)
            time.sleep(rng.uniform(0, 0.5))
            mode = "after_commits"
        else:
            stop_in(worker.proc, rng.uniform(0, 30))  # long enough to reach publish at times
            mode = "at_random_time"
        sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
        if worker.proc.poll() is None:
            worker.proc.send_signal(sig)
            kinds[sig.name] += 1
            kinds[mode] += 1
        code = worker.wait()
        # -SIGTERM: the signal came before the worker installed its handler (nothing to save)
        assert code in (0, EXIT_PREEMPTED, -signal.SIGTERM, -signal.SIGKILL, 137), worker.output()
        attempt += 1
        print(f"attempt {attempt}: {mode} exit {code}, {committed(store)}/{N} committed, "
              f"{proxy.injected()} storage faults", flush=True)
    final = start_worker(spec, tmp, attempt=attempt)
    assert final.wait() == 0, final.output()
    proxy.set_rate(0)
    counts = check_exactly_once(store, tmp, reference)
    counts.update(interruptions=kinds["SIGTERM"] + kinds["SIGKILL"], **kinds,
                  attempts=attempt + 1, storage_requests=proxy.requests,
                  storage_faults=proxy.injected(),
                  **{f"fault_{k}": v for k, v in sorted(proxy.counts.items())})
    print("\nchaos:", " ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


@pytest.mark.parametrize("interruptions", [
    pytest.param(4, id="4-interruptions"),
    pytest.param(int(os.environ.get("EMBEDJOB_CHAOS_INTERRUPTIONS", "50")), id="many",
                 marks=[pytest.mark.slow, pytest.mark.timeout(7200)]),
])
def test_chaos_exactly_once_under_storage_faults_and_kills(
    fasta, reference, tmp_path, s3_proxied, interruptions: int
) -> None:
    counts = chaos(fasta, reference, tmp_path, s3_proxied, interruptions, seed=interruptions)
    assert counts["interruptions"] >= interruptions
    assert counts["storage_faults"] > 0
    for name in ("lost", "duplicated", "unexpected", "differing", "orphans"):
        assert counts[name] == 0, counts
