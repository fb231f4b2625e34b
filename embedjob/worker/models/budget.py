"""``model.maxTokensPerBatch: auto``: the token budget a GPU can hold, from its free memory.

The choice is one pure function (:func:`auto_tokens_per_batch`) of the free device memory
measured *after* the weights are loaded (so the weights, the CUDA context and anything else
already resident are counted as they really are, not estimated) and the model's dimensions:
width and attention heads give the activation memory per padded token, width and depth the
work per token, which caps how long one batch may run. A documented safety margin covers the
allocator's fragmentation between batches of different shapes; when the estimate is still
wrong, the OOM policy halves the budget (``EMBEDJOB_MAX_TOKENS_PER_BATCH``) as for any
other value. On CPU ``auto`` keeps the fixed default: batches there are split into
CPU-sized forward passes anyway (``runtime.CPU_FORWARD_TOKENS``).
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
CPU_TOKENS = 16384
"""``auto`` on CPU: the spec's long-standing default (bench/README.md)."""
RESERVE_BYTES = 2 * 1024**3
"""Kept free for cuBLAS/attention workspaces and kernels' scratch, whatever the model."""
SAFETY = 0.7
"""Fraction of the rest that batches may fill: the caching allocator fragments when batch
shapes change (length-sorted batches widen as a shard goes on), so the peak a budget
reaches is larger than one clean forward pass of that size."""
MIN_TOKENS = 1024
"""Never below one full-length sequence (1022 residues + 2 special tokens)."""
MAX_TOKENS = 131072
"""Never above this: GPU matmuls are saturated long before (small models)."""
MAX_BATCH_FLOPS = 2e14
"""Nor above this much work per batch: about 1 s on an H100 at 40% MFU, 4 s on an L4. A
running batch finishes before the worker saves on SIGTERM, so a larger batch only makes that
wait longer (3B: ~35k tokens, 15B: ~6.6k; smaller models reach MAX_TOKENS first)."""
QUANTUM = 1024


@dataclass(frozen=True)
class ModelDims:
    """What sizes the activations of one forward pass."""

    dim: int
    ffn_dim: int
    heads: int
    value_bytes: int
    """2 for bf16/fp16, 4 for fp32."""
    layers: int = 1
    """Blocks a forward pass runs (compute per token; activations do not grow with it)."""
    attention_matrix: bool = False
    """True when the encoder materialises ``[heads, t, t]`` scores (eager attention);
    ours uses fused SDPA kernels, which do not."""
    max_width: int = 1024
    """Longest row in tokens (maxResidues + 2): the attention matrix's other side."""


def activation_bytes_per_token(d: ModelDims) -> int:
    """Peak bytes one padded token holds during a forward pass (layers run one at a time).

    Inside a block the peak is the MLP: residual and normed input (2 x dim), the fc1 output
    and its GELU (2 x ffn_dim); attention's q/k/v, rotated q/k and output copies reach about
    4 x dim at their own peak, counted on top to be safe. Pooling adds an fp32 copy of the
    last hidden state (4 bytes x dim).
    """
    values = 6 * d.dim + 2 * d.ffn_dim
    if d.attention_matrix:
        values += 2 * d.heads * d.max_width  # scores and their softmax
    return d.value_bytes * values + 4 * d.dim


def flops_per_token(d: ModelDims) -> float:
    """Matmul FLOPs of one token: 2 x the block weights (q, k, v, out and the MLP) per layer."""
    return 2.0 * d.layers * (4 * d.dim * d.dim + 2 * d.dim * d.ffn_dim)


def budget_limits(free_bytes: int, dims: ModelDims) -> dict[str, int]:
    """The three limits ``auto`` takes the smallest of (tokens): memory, time, the cap."""
    usable = (free_bytes - RESERVE_BYTES) * SAFETY
    return {
        "memory": max(0, int(usable // activation_bytes_per_token(dims))),
        "time per batch": int(MAX_BATCH_FLOPS // flops_per_token(dims)),
        "cap": MAX_TOKENS,
    }


def auto_tokens_per_batch(free_bytes: int, dims: ModelDims) -> int:
    """Token budget for ``free_bytes`` of device memory left after loading the model."""
    tokens = min(budget_limits(free_bytes, dims).values()) // QUANTUM * QUANTUM
    return max(MIN_TOKENS, tokens)


def binding_limit(free_bytes: int, dims: ModelDims) -> str:
    """Which limit chose the budget (``memory``, ``time per batch``, ``cap`` or ``floor``)."""
    limits = budget_limits(free_bytes, dims)
    name = min(limits, key=lambda k: limits[k])
    return "floor" if limits[name] < MIN_TOKENS else name


def embedder_dims(embedder: object) -> ModelDims:
    """The dimensions of a loaded embedder (ESM-2 from its architecture, HF from its config)."""
    value_bytes = 4 if getattr(embedder, "precision", "fp32") == "fp32" else 2
    encoder = getattr(embedder, "encoder", None)
    arch = getattr(encoder, "arch", None)
    if arch is not None:  # our ESM-2: fused SDPA attention
        width = int(getattr(embedder, "max_residues", 1022)) + 2
        return ModelDims(arch.dim, arch.ffn_dim, arch.heads, value_bytes,
                         layers=max(1, int(encoder.layer)), max_width=width)
    config = embedder.model.config  # type: ignore[attr-defined]
    dim = int(config.hidden_size)
    width = int(getattr(embedder, "max_length", None) or 1024)
    return ModelDims(
        dim, int(getattr(config, "intermediate_size", 4 * dim)),
        int(getattr(config, "num_attention_heads", 1)), value_bytes,
        layers=int(getattr(config, "num_hidden_layers", 1)), attention_matrix=True,
        max_width=width,
    )


def resolve_tokens_per_batch(
    override: int | None, configured: int | str, embedder: object
) -> tuple[int, str]:
    """The budget a worker runs at, and how it was chosen (for the log).

    The policy's override (after an OOM) wins; a number in the spec is used as is; ``auto``
    measures the free memory of the embedder's GPU now that the weights are on it.
    """
    if override:
        return override, "policy override (EMBEDJOB_MAX_TOKENS_PER_BATCH)"
    if configured != AUTO:
        return int(configured), "model.maxTokensPerBatch"
    device = getattr(embedder, "device", None)
    if device is None or device.type != "cuda":
        return CPU_TOKENS, "auto on CPU: the fixed default"
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    dims = embedder_dims(embedder)
    tokens = auto_tokens_per_batch(free, dims)
    limit = binding_limit(free, dims)
    return tokens, f"auto from {free / 1024**3:.1f} GiB free on {device} (limit: {limit})"
