"""What one pure reconcile pass costs at 1,000 and 10,000 shards: ours (incremental: the
job's memo of quiet units, summarised entries derived lazily) against the plain O(shards)
pass (the same ``reconcile`` without a memo, which is the algorithm before the memo), in the
same run. CPU seconds of this process (``time.process_time``), best of ``--rounds``; the
garbage collector tuned as the operator tunes it (``pacing.tune_interpreter``) for both sides.

    python bench/reconcile_pass.py [--shards 1000 10000] [--rounds 3] [--chunk 250]

Passes, for a job of N shards (parallelism N, index summary read):
- first: no worker pod yet. plain and "ours, all" create N pods in one plan; "ours,
  chunk" creates ``--chunk`` (what the operator does: createChunk).
- steady: every shard running with a progress report; nothing changed since the last pass
  (ours: the memo holds the previous pass).
- 50 failed: 50 running pods were preempted since the last pass (50 replacements).
- fresh look: steady, but the poller has just listed the heartbeats again: every running
  shard has a new observation of an unmoved beat (what each listing round hands the pass).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from operator_helpers import T0, job, with_state  # noqa: E402

from embedjob.failures import TerminationMessage  # noqa: E402
from embedjob.operator.config import OperatorSettings  # noqa: E402
from embedjob.operator.heartbeats import Observed, fold  # noqa: E402
from embedjob.operator.incremental import UnitMemo  # noqa: E402
from embedjob.operator.pacing import tune_interpreter  # noqa: E402
from embedjob.operator.pods import build_pod  # noqa: E402
from embedjob.operator.reconcile import reconcile  # noqa: E402
from embedjob.operator.views import IndexInfo, ShardProgress  # noqa: E402
from embedjob.policy import ShardHistory  # noqa: E402
from embedjob.progress import HeartbeatRecord  # noqa: E402

S = OperatorSettings()


def cpu(func: Any, rounds: int) -> tuple[float, Any]:
    """Best CPU seconds of ``func()`` over ``rounds``, and its last result."""
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.process_time()
        result = func()
        best = min(best, time.process_time() - start)
    return best, result


def scenario(n: int) -> dict[str, Any]:
    """The three worlds of one job of ``n`` shards."""
    spec = {"shards": n, "parallelism": n}
    index_pod = with_state(build_pod(job(**spec), "index", -1, 0, ShardHistory(), S),
                           "Succeeded", exit_code=0, reason="Completed")
    index = IndexInfo(n, 1000 * n)
    first = reconcile(job({"phase": "Indexing"}, **spec), [index_pod], {}, T0, S, index)
    manifests = first.pods_to_create
    running = [with_state(m, "Running", started=10) for m in manifests]
    progress = {s: ShardProgress(shard=s, attempt=0, done=400 + s % 500, total=1000,
                                 rate=2.5, updated=T0 + timedelta(seconds=30))
                for s in range(n)}
    now = T0 + timedelta(seconds=60)
    steady_job = job(first.status, **spec)
    steady = reconcile(steady_job, [index_pod, *running], progress, now, S, index)
    failed = list(running)
    text = TerminationMessage(type="preempted", message="SIGTERM").to_json()
    for s in range(0, n, n // 50):
        failed[s] = with_state(manifests[s], "Failed", exit_code=143, reason="Error",
                               message=text, started=10, finished=55)
    beat = HeartbeatRecord(attempt=0, stage="embedding", beat=7)
    beats = {s: fold(None, 0, beat, now.timestamp() - 20, "s3://b/o") for s in range(n)}
    return {"spec": spec, "beats": beats, "beat": beat, "index_pod": index_pod,
            "index": index, "first_job": job({"phase": "Indexing"}, **spec),
            "running": running, "failed": failed, "progress": progress,
            "now": now, "job": job(steady.status, **spec)}


def measure(n: int, rounds: int, chunk: int) -> list[tuple[str, float, float, str]]:
    w = scenario(n)
    idx, index, prog, now = w["index_pod"], w["index"], w["progress"], w["now"]
    rows = []

    def first(memo: UnitMemo | None, cap: int | None) -> Any:
        return reconcile(w["first_job"], [idx], {}, T0, S, index, memo=memo, max_creates=cap)

    plain, p = cpu(lambda: first(None, None), rounds)
    ours_all, _ = cpu(lambda: first(UnitMemo(), None), rounds)
    ours_chunk, c = cpu(lambda: first(UnitMemo(), chunk), rounds)
    rows.append((f"first ({len(p.pods_to_create)} pods)", plain, ours_all, "ours: all pods"))
    rows.append((f"first ({len(c.pods_to_create)} pods)", plain, ours_chunk,
                 f"ours: createChunk {chunk}"))

    for label, pods in (("steady", w["running"]), ("50 failed", w["failed"])):
        world = [idx, *pods]
        plain, p = cpu(lambda world=world: reconcile(w["job"], world, prog, now, S, index),
                       rounds)
        memo = UnitMemo()
        reconcile(w["job"], [idx, *w["running"]], prog, now, S, index, memo=memo)  # warm

        def ours(world: list = world, memo: UnitMemo = memo) -> Any:
            return reconcile(w["job"], world, prog, now, S, index, memo=memo)

        best, o = cpu(ours, rounds)
        assert o == p, "the memoized pass must equal the plain one"
        rows.append((f"{label} ({len(o.pods_to_create)} pods)", plain, best,
                     f"memo hits {memo.hits}"))
    rows.append(fresh_look(w, rounds))
    return rows


def looks(w: dict[str, Any], rounds: int) -> list[dict[int, Observed]]:
    """``rounds`` listing rounds, each a new observation of every shard's unmoved beat."""
    at = w["now"].timestamp() - 10
    return [{s: fold(o, 0, w["beat"], at + i, "s3://b/o") for s, o in w["beats"].items()}
            for i in range(rounds)]


def fresh_look(w: dict[str, Any], rounds: int) -> tuple[str, float, float, str]:
    world = [w["index_pod"], *w["running"]]
    args = (w["job"], world, w["progress"], w["now"], S, w["index"])
    plain, p = cpu(lambda: reconcile(*args, w["beats"]), rounds)
    memo = UnitMemo()
    reconcile(*args, w["beats"], memo=memo)  # warm: the round before
    rounds_ = iter(looks(w, rounds))
    hits = memo.hits
    best, o = cpu(lambda: reconcile(*args, next(rounds_), memo=memo), rounds)
    assert o == p, "the memoized pass must equal the plain one"
    return ("steady, fresh look (0 pods)", plain, best, f"memo hits {memo.hits - hits}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=S.create_chunk)
    args = parser.parse_args()
    tune_interpreter()
    print("| shards | pass | plain O(shards) CPU s | ours CPU s | plain / ours | note |")
    print("|---:|---|---:|---:|---:|---|")
    for n in args.shards:
        for label, plain, ours, note in measure(n, args.rounds, args.chunk):
            print(f"| {n} | {label} | {plain:.3f} | {ours:.4f} | {plain / ours:.1f}x | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
