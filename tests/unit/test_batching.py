"""make_batches: token budget, every index once, longest first, deterministic."""

from __future__ import annotations

import random

import pytest

from embedjob.worker.batching import make_batches


def _random_costs(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([3, 10, 50, 270, 1024, 3000]) + rng.randrange(20) for _ in range(n)]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("budget", [64, 1000, 4096, 16384])
def test_budget_respected_and_every_index_once(seed: int, budget: int) -> None:
    costs = _random_costs(seed, 200)
    batches = make_batches(costs, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(costs)))
    for b in batches:
        padded = max(costs[i] for i in b) * len(b)
        assert padded <= budget or len(b) == 1


def test_longest_first_and_sorted_within() -> None:
    costs = _random_costs(7, 300)
    batches = make_batches(costs, 4096)
    order = [costs[i] for b in batches for i in b]
    assert order == sorted(order, reverse=True)


def test_over_budget_sequence_gets_its_own_batch() -> None:
    assert make_batches([10, 5000, 10], 100) == [[1], [0, 2]]


def test_fills_batches_up_to_the_budget() -> None:
    # 10 sequences of 100 tokens under 400 -> batches of 4, 4, 2 (not one per sequence)
    assert [len(b) for b in make_batches([100] * 10, 400)] == [4, 4, 2]


def test_deterministic_with_ties_broken_by_index() -> None:
    costs = [5, 7, 5, 7, 5]
    assert make_batches(costs, 14) == [[1, 3], [0, 2], [4]]
    assert make_batches(list(costs), 14) == make_batches(costs, 14)


def test_empty_and_invalid() -> None:
    assert make_batches([], 100) == []
    with pytest.raises(ValueError):
        make_batches([1], 0)
