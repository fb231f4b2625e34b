"""The status is bounded in bytes (embedjob.status_bound), whatever its shards carry."""

from __future__ import annotations

import json

from operator_helpers import T0

from embedjob.ranges import range_set
from embedjob.spec import EmbeddingJobStatus, LastFailure, Phase, Progress, ShardEntry, ShardState
from embedjob.status import MANIFEST_CAP, Outline, dump_status, expand_manifest, job_status
from embedjob.status_bound import ENTRY_MAX_BYTES, STATUS_MAX_BYTES

N = 10_000


def _worst_entry(shard: int) -> ShardEntry:
    """A shard with everything long: the failure message, 16 avoided nodes with names of
    the longest DNS length, dozens of quarantined and isolated ids."""
    node = lambda i: f"ip-{shard}-{i}-" + "n" * 240  # noqa: E731
    return ShardEntry(
        shard=shard, state=ShardState.backoff, attempt=3 + shard % 7, pod=f"job-{shard}-3",
        done=123, total=1000, batch_tokens=512, precision="fp32",
        failures={"cuda_error": 2, "gpu_oom": 1},
        last_failure=LastFailure(type="cuda_error", message="x" * 300,
                                 time=f"2025-01-01T00:{shard % 60:02d}:00Z"),
        quarantined=40, not_before="2025-01-01T01:00:00Z",
        avoid_nodes=[node(i) for i in range(16)],
        isolate=[f"UniRef100_{shard}_{i:06d}" for i in range(30)],
        quarantine=[f"sp|P{shard:05d}{i:03d}|SOME_LONG_PROTEIN_NAME_HUMAN" for i in range(40)],
    )


def _size(status: EmbeddingJobStatus) -> int:
    return len(json.dumps({"status": dump_status(status)}).encode())


def test_the_worst_status_at_ten_thousand_shards_fits() -> None:
    # Every other shard done, the rest all failing with long histories: the range strings
    # are as fragmented as they get, and every entry is essential.
    unfinished = [s for s in range(N) if s % 2]
    entries = tuple(_worst_entry(s) for s in unfinished)
    outline = Outline(phase=Phase.running, message="m" * 5000, shard_count=N,
                      done=frozenset(range(0, N, 2)), failed=frozenset(range(1, N, 4)),
                      entries=entries, progress=Progress(),
                      unschedulable=tuple(f"pod-{s}" for s in range(100)))
    status = job_status(outline, EmbeddingJobStatus(), T0)
    assert _size(status) <= STATUS_MAX_BYTES
    kept = {e.shard: e for e in status.manifest}
    assert 0 < len(kept) < len(entries)
    assert status.manifest_omitted == len(entries) - len(kept)
    # Kept entries are whole (a cut quarantine list would run a crashing id again) ...
    assert all(e == _worst_entry(s) for s, e in kept.items())
    # ... and every left-out shard still has its attempt, so its pod can be found.
    expanded = expand_manifest(status, lambda s, a: f"job-{s}-{a}")
    assert {s: e.attempt for s, e in expanded.items()} == {e.shard: e.attempt for e in entries}
    assert range_set(status.shards_done) == set(range(0, N, 2))
    assert len(status.message) < 5000


def test_most_recent_failures_are_kept_first() -> None:
    entries = tuple(_worst_entry(s) for s in range(600))
    outline = Outline(phase=Phase.running, message="", shard_count=600, done=frozenset(),
                      failed=frozenset(), entries=entries, progress=Progress())
    status = job_status(outline, EmbeddingJobStatus(), T0)
    times = sorted({e.last_failure.time for e in entries}, reverse=True)
    newest = {e.last_failure.time for e in status.manifest}
    assert times[0] in newest and _size(status) <= STATUS_MAX_BYTES


def test_an_oversized_entry_is_left_to_its_pod_and_small_ones_still_fit() -> None:
    huge = _worst_entry(0).model_copy(update={
        "quarantine": [f"id-{i:08d}" for i in range(ENTRY_MAX_BYTES // 8)]})
    small = tuple(ShardEntry(shard=s, attempt=1, pod=f"j-{s}-1", batch_tokens=512)
                  for s in range(1, 50))
    outline = Outline(phase=Phase.running, message="", shard_count=50, done=frozenset(),
                      failed=frozenset(), entries=(huge, *small), progress=Progress())
    status = job_status(outline, EmbeddingJobStatus(), T0)
    assert [e.shard for e in status.manifest] == list(range(1, 50))
    assert status.manifest_omitted == 1


def test_the_entry_cap_still_holds() -> None:
    entries = tuple(ShardEntry(shard=s, attempt=1, pod=f"j-{s}-1", batch_tokens=512)
                    for s in range(2 * MANIFEST_CAP))
    outline = Outline(phase=Phase.running, message="", shard_count=2 * MANIFEST_CAP,
                      done=frozenset(), failed=frozenset(), entries=entries,
                      progress=Progress())
    status = job_status(outline, EmbeddingJobStatus(), T0)
    assert len(status.manifest) == MANIFEST_CAP
    assert status.manifest_omitted == MANIFEST_CAP
