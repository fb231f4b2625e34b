"""The suite's own layout: what `python -m pytest` (CI's one command) needs to collect it."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique_across_tiers() -> None:
    # The tiers are rootdir-relative packages-less folders: pytest imports each test module by its
    # basename, so two tiers with the same file name fail collection of the whole suite at once.
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
