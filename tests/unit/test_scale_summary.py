"""The operator bench's verdict over repeated runs (bench/scale_table.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from scale_table import summary


def run(lag_ms: int, p95: float) -> list[tuple[str, str, str, bool | None]]:
    return [
        ("reconcile pass time", "mean 1 s", "", None),
        ("event-loop lag", f"{lag_ms} ms", "<= 100 ms", lag_ms <= 100),
        ("replacement p95", f"{p95} s", "<= 2 s", p95 <= 2.0),
    ]


def test_a_target_is_met_when_most_runs_met_it() -> None:
    text, ok = summary("big", [run(75, 0.9), run(165, 1.9), run(90, 4.1)])
    assert ok  # lag: 2 of 3; p95: 2 of 3
    assert "| event-loop lag | 75 ms | 165 ms | 90 ms | <= 100 ms | 2 of 3 | pass |" in text
    assert "reconcile pass time" not in text  # rows without a target are not judged


def test_one_good_run_of_three_is_not_enough() -> None:
    text, ok = summary("big", [run(75, 0.9), run(165, 4.0), run(113, 4.1)])
    assert not ok
    assert "| replacement p95 | 0.9 s | 4.0 s | 4.1 s | <= 2 s | 1 of 3 | **FAIL** |" in text
