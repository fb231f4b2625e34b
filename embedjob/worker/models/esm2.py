"""A compact ESM-2 for inference: fair-esm's numbers, faster.

Loads fair-esm state dicts as they are and reproduces fair-esm's forward pass (token-dropout
scaling, pre-LayerNorm blocks, rotary q/k, exact-erf GELU, the final LayerNorm on the last
layer only) with fused QKV projections, cached rotary tables and PyTorch's
``scaled_dot_product_attention``. It has no dropout, LM head or contact head, and stops at
the requested layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedjob.failures import ConfigError
from embedjob.worker.batching import make_batches
from embedjob.worker.models.pooling import (
    gather_rows,
    masked_mean,
    plan_rows,
    residue_mask,
    row_tokens,
)
from embedjob.worker.models.registry import Esm2Arch
from embedjob.worker.models.runtime import CPU_FORWARD_TOKENS, check_finite, device_errors
from embedjob.worker.models.weights import check_esm2_state, esm2_state_dict

# fair-esm's ESM-1b alphabet (esm.data.Alphabet.from_architecture("ESM-1b")).
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
_RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"  # indices 4..30, in fair-esm's order
_MASK_RATIO_TRAIN = 0.15 * 0.8  # token dropout: fair-esm rescales embeddings by (1 - this)
_LN_EPS = 1e-5


def token_table() -> torch.Tensor:
    """A 256-entry byte -> token-id table (unknown letters map to <unk>, as in fair-esm)."""
    table = torch.full((256,), UNK, dtype=torch.long)
    for i, aa in enumerate(_RESIDUES):
        table[ord(aa)] = 4 + i
    return table


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        qk = _rotate(qkv[:, :, :2], cos, sin)  # q and k together: [b, t, 2, h, hd]
        q, k = qk.unbind(2)
        v = qkv[:, :, 2]
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the last dim of ``x [b, t, ..., hd]``; ``cos/sin [t, hd/2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    shape = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    c, s = cos.view(shape), sin.view(shape)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class Esm2Encoder(nn.Module):
    """ESM-2 up to ``layer`` (0 = embeddings); the final LayerNorm only when layer is the last."""

    def __init__(self, arch: Esm2Arch, layer: int, vocab: int = 33) -> None:
        super().__init__()
        self.arch = arch
        self.layer = layer
        self.final_norm = layer == arch.layers
        self.embed = nn.Embedding(vocab, arch.dim)
        self.blocks = nn.ModuleList(_Block(arch.dim, arch.heads) for _ in range(layer))
        self.norm_after = nn.LayerNorm(arch.dim, eps=_LN_EPS) if self.final_norm else None
        self.register_buffer("inv_freq", _inv_freq(arch), persistent=False)
        self._tables: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def rotary(self, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for ``t`` positions, cached at the longest length seen."""
        cached = self._tables
        if cached is None or cached[0] < t or cached[1].device != like.device:
            pos = torch.arange(max(t, 1026), device=like.device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(like.device, torch.float32))
            # computed in fp32, then cast: under half weights this is closer to fp32 fair-esm
            cached = (pos.numel(), freqs.cos().to(like.dtype), freqs.sin().to(like.dtype))
            self._tables = cached
        return cached[1][:t], cached[2][:t]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[b, t, dim]`` at ``self.layer`` for token ids ``[b, t]``."""
        pad = tokens.eq(PAD)
        x = self.embed(tokens)
        # token dropout at inference: no <mask> in the input, so fair-esm's rescale is a
        # constant (1 - 0.15*0.8) / (1 - observed mask ratio); keep the general form anyway
        is_mask = tokens.eq(MASK)
        if bool(is_mask.any()):
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
        observed = is_mask.sum(-1) / (~pad).sum(-1)
        scale = (1 - _MASK_RATIO_TRAIN) / (1 - observed)  # fp32 even for half weights
        x = (x.float() * (scale[:, None, None] * (~pad).unsqueeze(-1))).to(x.dtype)
        has_pad = bool(pad.any())
        mask = (~pad)[:, None, None, :] if has_pad else None
        cos, sin = self.rotary(tokens.shape[1], x)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        if self.norm_after is not None:
            x = self.norm_after(x)
        return x


def fuse_state_dict(
    state: dict[str, torch.Tensor],
    layer: int,
    convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, torch.Tensor]:
    """fair-esm keys (prefixes stripped) -> this module's keys, for blocks < ``layer``.

    ``convert`` moves each tensor to its device and dtype as it goes, so host memory never
    holds a second copy of a large model.
    """
    out = {"embed.weight": convert(state["embed_tokens.weight"])}
    for i in range(layer):
        p = f"layers.{i}."
        a = p + "self_attn."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.qkv.{kind}"] = torch.cat(
                [convert(state[f"{a}{n}_proj.{kind}"]) for n in ("q", "k", "v")]
            )
            out[f"blocks.{i}.out.{kind}"] = convert(state[f"{a}out_proj.{kind}"])
            out[f"blocks.{i}.ln1.{kind}"] = convert(state[f"{p}self_attn_layer_norm.{kind}"])
            out[f"blocks.{i}.ln2.{kind}"] = convert(state[f"{p}final_layer_norm.{kind}"])
            out[f"blocks.{i}.fc1.{kind}"] = convert(state[f"{p}fc1.{kind}"])
            out[f"blocks.{i}.fc2.{kind}"] = convert(state[f"{p}fc2.{kind}"])
    return out


class Esm2Embedder:
    """The ``Embedder`` for ESM-2 (see ``embedjob.worker.models``)."""

    before_forward: Callable[[], None] | None = None
    """Run before every forward pass (the worker's heartbeat and stop check)."""

    def __init__(
        self,
        encoder: Esm2Encoder,
        *,
        name: str,
        pooling: str,
        long_sequences: str,
        max_residues: int,
        window_overlap: int,
        device: torch.device,
        precision: str,
    ) -> None:
        self.encoder = encoder
        self.name = name
        self.dim = encoder.arch.dim
        self.layer = encoder.layer
        self.pooling = pooling
        self.long_sequences = long_sequences
        self.max_residues = max_residues
        self.window_overlap = window_overlap
        self.device = device
        self.precision = precision
        self.forward_tokens = CPU_FORWARD_TOKENS if device.type == "cpu" else None
        self._table = token_table().numpy().astype(np.int64)

    def tokens_for(self, length: int) -> int:
        return row_tokens(length, self.long_sequences, self.max_residues, self.window_overlap, 2)

    def embed(self, seqs: Sequence[str]) -> np.ndarray:
        if not seqs:
            return np.empty((0, self.dim), dtype=np.float32)
        rows = plan_rows(
            [len(s) for s in seqs], self.long_sequences, self.max_residues, self.window_overlap
        )
        pooled = np.empty((len(rows), self.dim), dtype=np.float32)
        costs = [e - s + 2 for _, s, e in rows]
        budget = self.forward_tokens or max(costs) * len(costs)
        for chunk in make_batches(costs, budget):
            if self.before_forward is not None:
                self.before_forward()
            texts = [seqs[rows[r][0]][rows[r][1] : rows[r][2]] for r in chunk]
            pooled[chunk] = self._forward(texts)
        check_finite(pooled, self.precision)
        return gather_rows(pooled, rows, len(seqs))

    def _forward(self, texts: list[str]) -> np.ndarray:
        lengths = [len(t) for t in texts]
        width = max(lengths) + 2
        toks = np.full((len(texts), width), PAD, dtype=np.int64)
        toks[:, 0] = CLS
        for j, text in enumerate(texts):
            toks[j, 1 : lengths[j] + 1] = self._table[np.frombuffer(text.encode(), np.uint8)]
            toks[j, lengths[j] + 1] = EOS
        tokens = torch.from_numpy(toks).to(self.device, non_blocking=True)
        with device_errors(self.device, toks.size), torch.inference_mode():
            hidden = self.encoder(tokens)
            if self.pooling == "cls":
                out = hidden[:, 0].float()
            else:
                lens = torch.tensor(lengths, device=self.device)
                out = masked_mean(hidden, residue_mask(lens, width))
            return out.cpu().numpy()


def load_esm2_encoder(
    data: dict, arch: Esm2Arch, layer: int, source: str, device: torch.device, dtype: torch.dtype
) -> Esm2Encoder:
    """Build the encoder up to ``layer`` from a loaded fair-esm checkpoint."""
    state = esm2_state_dict(data)
    cfg = data["cfg"].get("model") if isinstance(data.get("cfg"), dict) else None
    check_esm2_state(state, arch, source, cfg)

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    fused = fuse_state_dict(state, layer, convert)
    if layer == arch.layers:
        fused["norm_after.weight"] = convert(state["emb_layer_norm_after.weight"])
        fused["norm_after.bias"] = convert(state["emb_layer_norm_after.bias"])
    with torch.device("meta"):
        encoder = Esm2Encoder(arch, layer)
    try:
        encoder.load_state_dict(fused, assign=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        raise ConfigError(
            f"weights {source} do not fit {arch.name}: {lines[-1] if lines else err}"
        ) from None
    # rotary frequencies stay fp32 whatever the weights' dtype (tables are cast after)
    encoder.inv_freq = _inv_freq(arch).to(device)
    return encoder.eval()


def _inv_freq(arch: Esm2Arch) -> torch.Tensor:
    head_dim = arch.dim // arch.heads
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
