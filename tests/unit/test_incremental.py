"""The incremental pass (operator.incremental): a memoized pass equals a full pass, and a
pass capped at a create budget starts replacements first and tells only what it created."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta

import pytest
from operator_helpers import T0, job, with_state

from embedjob.failures import TerminationMessage
from embedjob.operator.config import OperatorSettings
from embedjob.operator.heartbeats import Observed, fold
from embedjob.operator.incremental import Entries, UnitMemo
from embedjob.operator.pods import build_pod
from embedjob.operator.reconcile import reconcile
from embedjob.operator.views import IndexInfo, PodView, ShardProgress, pod_view
from embedjob.policy import ShardHistory
from embedjob.progress import HeartbeatRecord
from embedjob.spec import EmbeddingJobStatus
from embedjob.status import attempt_name, expand_manifest

SHARDS = 12
S = OperatorSettings(stuck_after_seconds=120, unschedulable_after_seconds=60)
FAILURES = [("preempted", 143), ("gpu_oom", 80), ("cuda_error", 81), (None, 1),
            ("storage_error", 75)]


class World:
    """A job's pods, progress and status, changed at random between passes."""

    def __init__(self, rng: random.Random, parallelism: int) -> None:
        self.rng, self.t = rng, 10.0
        self.spec = {"shards": SHARDS, "parallelism": parallelism,
                     "retry": {"backoffSeconds": 5}}
        index = build_pod(job(**self.spec), "index", -1, 0, ShardHistory(), S)
        self.pods: dict[str, PodView] = {
            "j-index-0": with_state(index, "Succeeded", exit_code=0, reason="Completed")}
        self.manifests: dict[str, dict] = {}
        self.progress: dict[int, ShardProgress] = {}
        self.beats: dict[int, Observed] = {}
        self.status: dict = {"phase": "Indexing"}

    def apply(self, plan) -> None:
        for manifest in plan.pods_to_create:
            view = pod_view(manifest)
            assert view is not None
            self.pods[view.name], self.manifests[view.name] = view, manifest
        for name in plan.pods_to_delete:
            self.pods.pop(name, None)
        if plan.status is not None:
            self.status = plan.status

    def change(self) -> None:
        """One to three random things happen: pods move on, progress lands, time passes."""
        for _ in range(self.rng.randint(1, 3)):
            workers = [n for n in self.pods if n in self.manifests]
            what = self.rng.choice(["run", "run", "succeed", "fail", "vanish", "progress",
                                    "time", "big-time", "unsched", "copy", "look", "look",
                                    "beat"])
            if what == "time":
                self.t += self.rng.choice([1, 5, 20])
            elif what == "big-time":
                self.t += 130  # past stuck_after: running pods without progress are stuck
            elif what == "progress" and workers:
                pod = self.pods[self.rng.choice(workers)]
                done = self.rng.randint(1, 50)
                self.progress[pod.shard] = ShardProgress(
                    shard=pod.shard, attempt=pod.attempt, done=done, total=100, rate=1.5,
                    updated=T0 + timedelta(seconds=self.t))
            elif what in ("look", "beat") and workers:
                self._heartbeat(self.pods[self.rng.choice(workers)], what == "beat")
            elif workers:
                self._pod_event(what, self.rng.choice(workers))

    def _heartbeat(self, pod: PodView, moved: bool) -> None:
        """The poller's read: a fresh look at an unmoved beat, or a beat that moved."""
        before = self.beats.get(pod.shard)
        value = (before.beat.value if before else 0) + moved
        record = (HeartbeatRecord(attempt=pod.attempt, stage="embedding", beat=value)
                  if value > 0 else None)
        at = (T0 + timedelta(seconds=self.t)).timestamp()
        self.beats[pod.shard] = fold(before, pod.attempt, record, at, "s3://b/o")

    def _pod_event(self, what: str, name: str) -> None:
        manifest, pod = self.manifests[name], self.pods[name]
        if pod.terminated:
            return
        start = self.t - 1
        if what == "run":
            self.pods[name] = with_state(manifest, "Running", started=start)
        elif what == "succeed":
            self.pods[name] = with_state(manifest, "Succeeded", exit_code=0, reason="Completed",
                                         started=start, finished=self.t)
        elif what == "fail":
            kind, code = self.rng.choice(FAILURES)
            text = TerminationMessage(type=kind, message=f"{kind} here").to_json() if kind else None
            self.pods[name] = with_state(manifest, "Failed", exit_code=code, reason="Error",
                                         message=text, started=start, finished=self.t)
        elif what == "vanish":
            del self.pods[name]
        elif what == "unsched":
            self.pods[name] = dataclasses.replace(
                pod, phase="Pending", unschedulable_since=T0 + timedelta(seconds=self.t),
                unschedulable_message="0/3 nodes are available")
        else:  # the same pod, seen again as an equal but new object
            self.pods[name] = dataclasses.replace(pod)

    def now(self):
        return T0 + timedelta(seconds=self.t)


@pytest.mark.parametrize("seed", range(12))
def test_memoized_pass_equals_full_pass(seed: int) -> None:
    rng = random.Random(seed)
    world = World(rng, parallelism=rng.choice([4, 8, SHARDS]))
    memo = UnitMemo()
    index = IndexInfo(SHARDS, 100 * SHARDS)
    hits = 0
    for _ in range(60):
        chunk = rng.choice([None, 1, 3, 100])
        args = (job(world.status, **world.spec), list(world.pods.values()),
                dict(world.progress), world.now(), S, index, dict(world.beats))
        full = reconcile(*args, max_creates=chunk)
        fast = reconcile(*args, memo=memo, max_creates=chunk)
        assert fast == full
        hits += memo.hits
        world.apply(full)
        world.change()
    assert hits > 0  # the memo was used, not just filled


def test_a_fresh_look_keeps_quiet_units_until_it_finds_a_worker_stuck() -> None:
    """Every listing round observes every running shard anew: an unmoved beat seen again
    must not re-decide the shard, and one seen silent past the threshold must."""
    spec = {"shards": 4, "parallelism": 4}
    j = job({"phase": "Running"}, **spec)
    pods = [with_state(build_pod(j, "worker", s, 0, ShardHistory(attempts=1), S), "Running",
                       started=0) for s in range(4)]
    j = job(reconcile(j, pods, {}, T0, S, IndexInfo(4, 40)).status, **spec)
    record = HeartbeatRecord(attempt=0, stage="embedding", beat=1)
    beats = {s: fold(None, 0, record, T0.timestamp() + 5, "s3://b/o") for s in range(4)}
    memo = UnitMemo()

    def passes(t: float) -> tuple:
        now = T0 + timedelta(seconds=t)
        full = reconcile(j, pods, {}, now, S, IndexInfo(4, 40), dict(beats))
        fast = reconcile(j, pods, {}, now, S, IndexInfo(4, 40), dict(beats), memo=memo)
        assert fast == full
        return fast, memo.hits

    assert passes(10)[0].pods_to_create == []
    beats = {s: fold(o, 0, None, T0.timestamp() + 60, "s3://b/o") for s, o in beats.items()}
    plan, hits = passes(60)
    assert plan.pods_to_create == [] and hits == 4  # a fresh look, nothing new: kept
    beats[2] = fold(beats[2], 0, None, T0.timestamp() + 300, "s3://b/o")
    plan, hits = passes(300)  # shard 2 was seen silent for 295 s: stuck, decided anew
    assert [m["metadata"]["name"] for m in plan.pods_to_create] == ["j-2-1"]
    assert hits == 3


def test_entries_are_the_expanded_manifest() -> None:
    status = EmbeddingJobStatus.model_validate({
        "shardAttempts": {"0": "0-5,9", "2": "7-8", "x": "3"}, "shardsRunning": "1-2,7",
        "manifest": [{"shard": 4, "state": "Backoff", "attempt": 1, "pod": "j-4-1"},
                     {"shard": 6, "attempt": 0}]})

    def name(s: int, a: int) -> str:
        return attempt_name("j", "worker", s, a)

    lazy, eager = Entries(status, name), expand_manifest(status, name)
    assert dict(lazy) == eager and len(lazy) == len(eager)
    assert sorted(lazy.pods()) == sorted((s, e.pod) for s, e in eager.items() if e.pod)
    assert 11 not in lazy and lazy.key(11) is None and lazy.key(1) == (0, True)


def test_a_capped_pass_starts_replacements_first_and_tells_only_what_it_made() -> None:
    spec = {"shards": 10, "parallelism": 10}
    j = job({"phase": "Running"}, **spec)
    evicted = with_state(build_pod(j, "worker", 7, 0, ShardHistory(attempts=1), S), "Failed",
                         exit_code=143, reason="Error", message=TerminationMessage(
                             type="preempted", message="SIGTERM").to_json())
    plan = reconcile(j, [evicted], {}, T0, S, IndexInfo(10, 100), max_creates=3)
    names = [m["metadata"]["name"] for m in plan.pods_to_create]
    assert names == ["j-7-1", "j-0-0", "j-1-0"]
    assert plan.status["shardAttempts"] == {"0": "0-1", "1": "7"}
    assert plan.requeue_after == 0.0  # the next chunk follows at once


def test_lost_pods_are_replaced_beyond_the_budget() -> None:
    j = job({"phase": "Running"}, shards=3, parallelism=3)
    pods = [with_state(build_pod(j, "worker", s, 0, ShardHistory(attempts=1), S), "Running")
            for s in range(3)]
    pods[1] = dataclasses.replace(pods[1], phase="Unknown")
    plan = reconcile(j, pods, {}, T0, S, IndexInfo(3, 30), max_creates=0)
    assert [m["metadata"]["name"] for m in plan.pods_to_create] == ["j-1-1"]
