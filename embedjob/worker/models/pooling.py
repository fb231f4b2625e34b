"""Pooling and long-sequence windows: pure functions shared by all encoders.

Window rule (``model.longSequences: window``): a sequence of ``n`` residues longer than
``W = maxResidues`` is cut into windows of ``W`` residues whose starts step by
``W - windowOverlap``; the last window is shifted left to end exactly at the sequence end
(so every window holds ``W`` residues). Each window is pooled on its own (mean over its
residues, or its BOS/CLS token), and the sequence's embedding is the mean of the window
embeddings weighted by the residues each window holds — with full windows, a plain mean.
"""

from __future__ import annotations

import numpy as np
import torch


def window_spans(length: int, max_residues: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` residue spans covering ``length`` residues (one span if it fits)."""
    if length <= max_residues:
        return [(0, length)]
    step = max_residues - overlap
    if step < 1:
        raise ValueError("overlap must be smaller than max_residues")
    starts = list(range(0, length - max_residues, step))
    starts.append(length - max_residues)
    return [(s, s + max_residues) for s in starts]


def combine_windows(embeddings: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Residue-weighted mean of per-window embeddings ``[w, dim]`` (fp64 sum, fp32 out)."""
    weights = np.array([end - start for start, end in spans], dtype=np.float64)
    total = (embeddings.astype(np.float64) * weights[:, None]).sum(0) / weights.sum()
    return total.astype(np.float32)


def residue_mask(lengths: torch.Tensor, width: int, offset: int = 1) -> torch.Tensor:
    """``[b, width]`` bool: True at the residue positions ``offset .. offset+len-1`` of each row."""
    pos = torch.arange(width, device=lengths.device)
    return (pos[None, :] >= offset) & (pos[None, :] < offset + lengths[:, None])


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of ``hidden [b, t, d]``, accumulated in fp32."""
    weights = mask.to(torch.float32)
    summed = torch.einsum("btd,bt->bd", hidden.to(torch.float32), weights)
    return summed / weights.sum(1, keepdim=True).clamp_min(1.0)


def plan_rows(
    lengths: list[int], long_sequences: str, max_residues: int, overlap: int
) -> list[tuple[int, int, int]]:
    """Forward-pass rows ``(sequence index, start, end)``: one per sequence, one per window."""
    rows: list[tuple[int, int, int]] = []
    for i, n in enumerate(lengths):
        if long_sequences == "window":
            rows.extend((i, s, e) for s, e in window_spans(n, max_residues, overlap))
        else:
            rows.append((i, 0, min(n, max_residues)))
    return rows


def row_tokens(
    length: int, long_sequences: str, max_residues: int, overlap: int, extra: int
) -> int:
    """Padded tokens one sequence costs: its rows' residues plus ``extra`` specials per row."""
    if length <= max_residues:  # the common case, called once per input sequence
        return length + extra
    spans = plan_rows([length], long_sequences, max_residues, overlap)
    return sum(e - s + extra for _, s, e in spans)


def gather_rows(pooled: np.ndarray, rows: list[tuple[int, int, int]], n: int) -> np.ndarray:
    """Per-row embeddings -> per-sequence embeddings (windows combined by residue weight)."""
    out = np.empty((n, pooled.shape[1]), dtype=np.float32)
    by_seq: dict[int, list[int]] = {}
    for r, (i, _, _) in enumerate(rows):
        by_seq.setdefault(i, []).append(r)
    for i, rs in by_seq.items():
        if len(rs) == 1:
            out[i] = pooled[rs[0]]
        else:
            out[i] = combine_windows(pooled[rs], [rows[r][1:] for r in rs])
    return out
