import numpy as np
import pytest

from embedjob.failures import CudaError, GpuOutOfMemory, TransientStorageError
from embedjob.worker.failpoints import Failpoints, parse


def test_parse_and_match_conditions() -> None:
    points = parse("gpu_oom:batch=2,attempt=0; nan:id=seqA ;")
    assert [p.action for p in points] == ["gpu_oom", "nan"]
    assert points[0].matches(2, 0, 5, [])
    assert not points[0].matches(2, 1, 5, [])
    assert not points[0].matches(3, 0, 5, [])
    assert points[1].matches(7, 3, 0, ["x", "seqA"])
    assert not points[1].matches(7, 3, 0, ["x"])


def test_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown failpoint action 'explode'"):
        parse("explode:batch=1")


@pytest.mark.parametrize(
    ("spec", "error"),
    [("gpu_oom:batch=1", GpuOutOfMemory), ("cuda_error:batch=1", CudaError),
     ("storage_error:batch=1", TransientStorageError)],
)
def test_raising_points_fire_at_their_batch(spec: str, error: type) -> None:
    fp = Failpoints(parse(spec), shard=0, attempt=0)
    fp.before_batch(0, ["a"])
    with pytest.raises(error):
        fp.before_batch(1, ["a"])


def test_times_limits_firing_and_nan_poisons_output() -> None:
    fp = Failpoints(parse("nan:times=1"), shard=0, attempt=0)
    first, second = np.zeros((2, 3)), np.zeros((2, 3))
    fp.after_batch(0, ["a", "b"], first)
    fp.after_batch(1, ["a", "b"], second)
    assert np.isnan(first).any() and not np.isnan(second).any()
