"""Pooling masks, windows and layer resolution (pure parts of the model layer)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from embedjob.failures import ConfigError
from embedjob.worker.models.pooling import (
    combine_windows,
    gather_rows,
    masked_mean,
    plan_rows,
    residue_mask,
    row_tokens,
    window_spans,
)
from embedjob.worker.models.registry import resolve_layer


def test_residue_mask_excludes_bos_eos_and_padding() -> None:
    mask = residue_mask(torch.tensor([3, 1]), width=5)
    assert mask.tolist() == [
        [False, True, True, True, False],
        [False, True, False, False, False],
    ]


def test_masked_mean_uses_only_masked_positions_in_fp32() -> None:
    hidden = torch.tensor([[[100.0], [1.0], [3.0], [-7.0]]], dtype=torch.float16)
    mask = torch.tensor([[False, True, True, False]])
    out = masked_mean(hidden, mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [[2.0]]


def test_window_spans_short_sequence_is_one_window() -> None:
    assert window_spans(30, 40, 10) == [(0, 30)]
    assert window_spans(40, 40, 10) == [(0, 40)]


def test_window_spans_rule() -> None:
    # step = 40 - 10 = 30; last window shifted left to end at the sequence end
    assert window_spans(100, 40, 10) == [(0, 40), (30, 70), (60, 100)]
    assert window_spans(41, 40, 10) == [(0, 40), (1, 41)]


@pytest.mark.parametrize("extra", [1, 59, 60, 1001, 2500, 5000])
@pytest.mark.parametrize(("size", "overlap"), [(40, 10), (1022, 256), (50, 0)])
def test_window_spans_cover_everything_with_full_windows(
    extra: int, size: int, overlap: int
) -> None:
    length = size + extra
    spans = window_spans(length, size, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(e - s == size for s, e in spans)
    for (s0, e0), (s1, _) in itertools.pairwise(spans):
        assert s1 > s0 and s1 <= e0  # progress and no gap
        assert e0 - s1 >= overlap  # at least the requested overlap


def test_combine_windows_weights_by_residues() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    out = combine_windows(emb, [(0, 30), (30, 40)])
    np.testing.assert_allclose(out, [0.75, 0.25])


def test_plan_rows_truncate_and_window() -> None:
    assert plan_rows([5, 120], "truncate", 100, 20) == [(0, 0, 5), (1, 0, 100)]
    assert plan_rows([5, 120], "window", 100, 20) == [(0, 0, 5), (1, 0, 100), (1, 20, 120)]
    assert row_tokens(120, "truncate", 100, 20, 2) == 102
    assert row_tokens(120, "window", 100, 20, 2) == 204


def test_gather_rows_combines_windows_of_each_sequence() -> None:
    rows = [(0, 0, 5), (1, 0, 100), (1, 20, 120)]
    pooled = np.array([[1.0], [2.0], [4.0]], dtype=np.float32)
    np.testing.assert_allclose(gather_rows(pooled, rows, 2), [[1.0], [3.0]])


@pytest.mark.parametrize(("layer", "expected"), [(-1, 6), (6, 6), (0, 0), (-7, 0), (3, 3)])
def test_resolve_layer(layer: int, expected: int) -> None:
    assert resolve_layer(layer, 6) == expected


@pytest.mark.parametrize("layer", [7, -8])
def test_resolve_layer_out_of_range(layer: int) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layer(layer, 6)
