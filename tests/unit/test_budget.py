"""``model.maxTokensPerBatch: auto``: the pure choice, the spec, and the OOM policy's halving."""

from __future__ import annotations

import pytest
import torch

from embedjob.failures import ConfigError, Failure, FailureType, TerminationMessage, classify_exit
from embedjob.policy import AUTO_FALLBACK_TOKENS, MIN_TOKENS_PER_BATCH, ShardHistory, decide
from embedjob.spec import ModelSpec, parse_spec
from embedjob.worker.models.budget import (
    CPU_TOKENS,
    MAX_BATCH_FLOPS,
    MAX_TOKENS,
    MIN_TOKENS,
    RESERVE_BYTES,
    SAFETY,
    ModelDims,
    activation_bytes_per_token,
    auto_tokens_per_batch,
    binding_limit,
    budget_limits,
    embedder_dims,
    flops_per_token,
    resolve_tokens_per_batch,
)
from embedjob.worker.models.registry import ESM2_ARCHS

GiB = 1024**3


def dims(name: str, value_bytes: int = 2, layers: int = 1) -> ModelDims:
    a = ESM2_ARCHS[name]
    return ModelDims(a.dim, a.ffn_dim, a.heads, value_bytes, layers=layers)


def test_per_token_bytes_follow_the_width_and_precision() -> None:
    d650 = dims("esm2_t33_650M_UR50D")
    assert activation_bytes_per_token(d650) == 2 * (6 * 1280 + 2 * 5120) + 4 * 1280
    assert activation_bytes_per_token(dims("esm2_t33_650M_UR50D", 4)) > activation_bytes_per_token(
        d650)
    assert activation_bytes_per_token(dims("esm2_t36_3B_UR50D")) == 2 * activation_bytes_per_token(
        d650)
    eager = ModelDims(1280, 5120, 20, 2, attention_matrix=True, max_width=1024)
    assert activation_bytes_per_token(eager) == activation_bytes_per_token(d650) + 2 * 2 * 20 * 1024


def test_budget_grows_with_free_memory_and_shrinks_with_width() -> None:
    d = dims("esm2_t33_650M_UR50D")
    small, large = auto_tokens_per_batch(8 * GiB, d), auto_tokens_per_batch(12 * GiB, d)
    assert MIN_TOKENS < small < large
    assert auto_tokens_per_batch(8 * GiB, dims("esm2_t36_3B_UR50D")) < small
    expected = int((8 * GiB - RESERVE_BYTES) * SAFETY // activation_bytes_per_token(d))
    assert expected - 1024 < small <= expected and small % 1024 == 0


def test_budget_is_clamped() -> None:
    d = dims("esm2_t33_650M_UR50D", layers=33)
    assert auto_tokens_per_batch(140 * GiB, d) == MAX_TOKENS  # an empty H200
    assert binding_limit(140 * GiB, d) == "cap"
    assert auto_tokens_per_batch(RESERVE_BYTES // 2, d) == MIN_TOKENS  # nearly full: the floor
    assert binding_limit(RESERVE_BYTES // 2, d) == "floor"
    assert auto_tokens_per_batch(0, d) == MIN_TOKENS


def test_deep_wide_models_are_limited_by_the_work_per_batch() -> None:
    # a running batch finishes before the worker saves on SIGTERM: bound its FLOPs
    d3b = dims("esm2_t36_3B_UR50D", layers=36)
    assert flops_per_token(d3b) == 2 * 36 * (4 * 2560**2 + 2 * 2560 * 10240)
    tokens = auto_tokens_per_batch(140 * GiB, d3b)
    assert binding_limit(140 * GiB, d3b) == "time per batch"
    assert tokens == int(MAX_BATCH_FLOPS // flops_per_token(d3b)) // 1024 * 1024 == 34816
    d15b = dims("esm2_t48_15B_UR50D", layers=48)
    assert auto_tokens_per_batch(140 * GiB, d15b) < tokens
    limits = budget_limits(3 * GiB, d15b)  # a 15B squeezed into what is left: memory binds
    assert binding_limit(3 * GiB, d15b) == "memory" and limits["memory"] < limits["cap"]


def test_auto_on_cpu_keeps_the_fixed_default_and_numbers_pass_through() -> None:
    class Cpu:
        device = torch.device("cpu")
        precision = "fp32"

    assert resolve_tokens_per_batch(None, "auto", Cpu())[0] == CPU_TOKENS == 16384
    assert resolve_tokens_per_batch(None, 4096, Cpu())[0] == 4096
    assert resolve_tokens_per_batch(512, "auto", Cpu()) == (
        512, "policy override (EMBEDJOB_MAX_TOKENS_PER_BATCH)")


def test_dims_of_our_esm2_embedder() -> None:
    from embedjob.worker.models.esm2 import Esm2Embedder, Esm2Encoder

    arch = ESM2_ARCHS["esm2_t33_650M_UR50D"]
    with torch.device("meta"):
        encoder = Esm2Encoder(arch, 0)
    emb = Esm2Embedder(encoder, name=arch.name, pooling="mean", long_sequences="truncate",
                       max_residues=500, window_overlap=10, device=torch.device("cpu"),
                       precision="bf16")
    assert embedder_dims(emb) == ModelDims(1280, 5120, 20, 2, layers=1, max_width=502)


def test_spec_accepts_auto_and_numbers_only() -> None:
    assert ModelSpec(max_tokens_per_batch="auto").max_tokens_per_batch == "auto"
    assert ModelSpec.model_validate({"maxTokensPerBatch": 4096}).max_tokens_per_batch == 4096
    assert ModelSpec().max_tokens_per_batch == 16384
    for bad in (8, "big", "4096", 8.5, True, None):  # the API server refuses the same
        with pytest.raises(ConfigError, match=r"maxTokensPerBatch: use a number of tokens >= 64"):
            parse_spec({"input": {"uri": "a.fa"}, "output": {"uri": "o/"},
                        "model": {"maxTokensPerBatch": bad}})


def auto_spec():
    return parse_spec({"input": {"uri": "a.fa"}, "output": {"uri": "o/"},
                       "model": {"maxTokensPerBatch": "auto"}})


def test_gpu_oom_under_auto_halves_what_the_worker_chose() -> None:
    # the worker reports its budget in the termination message; the policy halves that
    message = TerminationMessage(type="gpu_oom", message="GPU out of memory", batch_tokens=73728)
    failure = classify_exit(80, TerminationMessage.from_json(message.to_json()))
    assert failure.batch_tokens == 73728
    d = decide(auto_spec(), ShardHistory(attempts=1), failure, False)
    assert d.action == "retry" and d.history.max_tokens == 36864
    again = decide(auto_spec(), d.history, Failure(FailureType.gpu_oom, "", batch_tokens=36864),
                   False)
    assert again.history.max_tokens == 18432


def test_oom_under_auto_without_a_report_and_the_floor() -> None:
    killed = Failure(FailureType.host_oom, "container OOMKilled (memory limit)")
    d = decide(auto_spec(), ShardHistory(attempts=1), killed, False)
    assert d.history.max_tokens == AUTO_FALLBACK_TOKENS // 2
    floor = Failure(FailureType.gpu_oom, "", batch_tokens=MIN_TOKENS_PER_BATCH)
    assert decide(auto_spec(), ShardHistory(attempts=1), floor, False).action == "fail"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_budget_on_the_gpu_runs_a_full_batch(tmp_path) -> None:
    import numpy as np

    from embedjob.worker.models import load_embedder

    model = ModelSpec(name="esm2_t6_8M_UR50D", weights="random")
    emb = load_embedder(model, device="cuda", cache_dir=str(tmp_path))
    tokens, how = resolve_tokens_per_batch(None, "auto", emb)
    assert MIN_TOKENS <= tokens <= MAX_TOKENS and "GiB free on cuda" in how
    out = emb.embed(["ACDEFGHIKLMNPQRSTVWY" * 51] * (tokens // 1024))  # full-length rows
    assert out.shape == (tokens // 1024, 320) and np.isfinite(out).all()
