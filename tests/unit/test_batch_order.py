"""Positions in a shard's batch order (embedjob.batch_order) and how the worker batches by
them: every batch is one run of positions among the rows still pending."""

from __future__ import annotations

import numpy as np

from embedjob.batch_order import isolated_mask, parse_run, positions, run_of, within
from embedjob.worker.runner import plan_batches


def test_positions_rank_longest_first_ties_by_row() -> None:
    assert positions([5, 9, 5, 7]).tolist() == [2, 0, 3, 1]


def test_runs_parse_and_contain() -> None:
    assert run_of([7, 3, 5]) == "3-7" and run_of([4]) == "4" and run_of([]) == ""
    assert parse_run("3-7") == (3, 7) and parse_run("4") == (4, 4)
    assert parse_run("seq-1") is None and parse_run("7-3") is None and parse_run("") is None
    assert within("4-5", ["0-2", "3-7"]) and not within("6-9", ["3-7"])
    assert isolated_mask(["1-2", "junk", "4"], 6).tolist() == [False, True, True, False,
                                                                True, False]


def test_each_batch_is_one_run_and_isolated_rows_run_alone_first() -> None:
    rng = np.random.default_rng(3)
    costs = rng.integers(10, 200, size=60)
    where = positions(costs)
    done = rng.random(60) < 0.3  # committed earlier, anywhere in the order
    todo = np.flatnonzero(~done)
    isolated = isolated_mask(["10-14"], 60)
    batches = plan_batches(costs, where, todo, isolated, max_tokens=600)
    alone = [b for b in batches if isolated[where[b]].any()]
    assert all(len(b) == 1 for b in alone)
    assert [b.tolist() for b in batches[: len(alone)]] == [b.tolist() for b in alone]
    pending_positions = sorted(where[todo].tolist())
    for rows in batches[len(alone):]:
        lo, hi = parse_run(run_of(where[rows].tolist()))
        # Every pending, not isolated row inside the batch's run is in the batch: the run
        # names the batch exactly, in this attempt and in the next.
        inside = [p for p in pending_positions if lo <= p <= hi and not isolated[p]]
        assert sorted(where[rows].tolist()) == inside
