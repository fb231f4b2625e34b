import pytest

from embedjob.ranges import format_ranges, parse_ranges


@pytest.mark.parametrize(
    ("indexes", "text"),
    [([], ""), ([3], "3"), ([0, 1, 2, 5], "0-2,5"), ([9, 1, 0, 2, 7, 8], "0-2,7-9"), ([4, 4], "4")],
)
def test_round_trip(indexes: list[int], text: str) -> None:
    assert format_ranges(indexes) == text
    assert parse_ranges(text) == sorted(set(indexes))


def test_thousands_of_shards_stay_short() -> None:
    done = [i for i in range(10000) if i != 4321]
    assert format_ranges(done) == "0-4320,4322-9999"
