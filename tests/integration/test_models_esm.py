"""Our ESM-2 against fair-esm's own forward pass, on random weights of the real architectures.

fair-esm is the numerical reference: the 8M model in full (loaded by fair-esm's own loader
from the checkpoint we write), the larger widths/head counts with one or two layers.
"""

from __future__ import annotations

import dataclasses
import warnings
from fractions import Fraction
from pathlib import Path

import esm
import numpy as np
import pytest
import torch

from embedjob.failures import ConfigError
from embedjob.spec import ModelSpec
from embedjob.worker.models import load_embedder, write_random_esm2_checkpoint
from embedjob.worker.models.esm2 import token_table
from embedjob.worker.models.loader import esm2_from_checkpoint
from embedjob.worker.models.pooling import window_spans
from embedjob.worker.models.registry import ESM2_ARCHS

SMALL = "esm2_t6_8M_UR50D"
SEQS = [
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUZOBX",
    "MLV",
    "ACDEFGHIKLMNPQRSTVWYXBUZO" * 3,
    "M" + "GS" * 40,
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_equal_embeddings(ours: np.ndarray, ref: np.ndarray, cos: float = 0.99999) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert cosines(ours, ref).min() >= cos
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def fair_esm_model(path: Path, name: str) -> tuple[torch.nn.Module, esm.data.Alphabet]:
    """fair-esm's own loader on our checkpoint (our test file, so a full unpickle is fine)."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no contact-regression weights: irrelevant here
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(name, data)
    return model.eval(), alphabet


def fair_esm_meta(path: Path, layers: int, dim: int, heads: int) -> torch.nn.Module:
    """fair-esm's ESM2 module built without random init (fast for 15B widths)."""
    data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    state = {k.removeprefix("encoder.sentence_encoder."): v for k, v in data["model"].items()}
    with torch.device("meta"):
        model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads)
    model.load_state_dict(state, strict=False, assign=True)  # contact head unused
    return model.eval()


def reference(
    model: torch.nn.Module,
    seqs: list[str],
    layer: int,
    pooling: str = "mean",
    truncate: int | None = None,
) -> np.ndarray:
    """fair-esm's extract-script pooling: tokens 1..len for mean, token 0 for cls."""
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    _, _, toks = alphabet.get_batch_converter(truncate)([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        rep = model(toks, repr_layers=[layer])["representations"][layer]
    out = []
    for i, s in enumerate(seqs):
        n = min(len(s), truncate) if truncate else len(s)
        out.append(rep[i, 0] if pooling == "cls" else rep[i, 1 : n + 1].mean(0))
    return torch.stack(out).numpy()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / f"{SMALL}.pt"
    write_random_esm2_checkpoint(SMALL, str(path), seed=3)
    return path


@pytest.fixture(scope="module")
def small_ref(small_ckpt: Path) -> torch.nn.Module:
    return fair_esm_model(small_ckpt, SMALL)[0]


def spec(path: Path, **kw: object) -> ModelSpec:
    return ModelSpec(name=SMALL, weights=str(path), **kw)


def test_token_table_matches_fair_esm_alphabet() -> None:
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    table = token_table()
    for letter in "ACDEFGHIKLMNPQRSTVWYXBUZO.-":
        assert table[ord(letter)] == alphabet.encode(letter)[0], letter


@pytest.mark.parametrize(
    ("layer", "pooling"), [(-1, "mean"), (-1, "cls"), (3, "mean"), (0, "mean")]
)
def test_8m_equals_fair_esm(
    small_ckpt: Path, small_ref: torch.nn.Module, layer: int, pooling: str
) -> None:
    emb = load_embedder(spec(small_ckpt, layer=layer, pooling=pooling), device="cpu")
    assert (emb.dim, emb.precision, emb.device.type) == (320, "fp32", "cpu")
    resolved = 6 if layer == -1 else layer
    assert emb.layer == resolved
    assert_equal_embeddings(emb.embed(SEQS), reference(small_ref, SEQS, resolved, pooling))


def test_the_comparison_can_fail(small_ckpt: Path, small_ref: torch.nn.Module) -> None:
    # a neighbouring layer, or the last layer without its final LayerNorm, must not pass
    ours = load_embedder(spec(small_ckpt), device="cpu").embed(SEQS)
    assert cosines(ours, reference(small_ref, SEQS, 5)).min() < 0.99
    no_norm = load_embedder(spec(small_ckpt, layer=5), device="cpu").embed(SEQS)
    assert cosines(no_norm, ours).min() < 0.99


def test_batch_composition_does_not_change_results(small_ckpt: Path) -> None:
    emb = load_embedder(spec(small_ckpt), device="cpu")
    together = emb.embed(SEQS)
    alone = np.concatenate([emb.embed([s]) for s in SEQS])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_truncation_matches_fair_esm_truncation(
    small_ckpt: Path, small_ref: torch.nn.Module
) -> None:
    emb = load_embedder(spec(small_ckpt, max_residues=50, window_overlap=10), device="cpu")
    assert emb.tokens_for(200) == 52 and emb.tokens_for(20) == 22
    assert_equal_embeddings(emb.embed(SEQS), reference(small_ref, SEQS, 6, truncate=50))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_windows_follow_the_documented_rule(
    small_ckpt: Path, small_ref: torch.nn.Module, pooling: str
) -> None:
    size, overlap = 40, 10
    model = spec(
        small_ckpt,
        max_residues=size,
        window_overlap=overlap,
        long_sequences="window",
        pooling=pooling,
    )
    emb = load_embedder(model, device="cpu")
    expected = []
    for s in SEQS:
        spans = window_spans(len(s), size, overlap)
        per_window = reference(small_ref, [s[a:b] for a, b in spans], 6, pooling)
        weights = np.array([b - a for a, b in spans], dtype=np.float64)
        expected.append((per_window * weights[:, None]).sum(0) / weights.sum())
    assert emb.tokens_for(100) == 3 * (size + 2)
    assert_equal_embeddings(emb.embed(SEQS), np.array(expected, dtype=np.float32))


@pytest.mark.parametrize(
    ("name", "layers"),
    [
        ("esm2_t12_35M_UR50D", 2),
        ("esm2_t30_150M_UR50D", 2),
        ("esm2_t33_650M_UR50D", 1),
        ("esm2_t36_3B_UR50D", 1),
        ("esm2_t48_15B_UR50D", 1),
    ],
)
def test_larger_architectures_equal_fair_esm(tmp_path: Path, name: str, layers: int) -> None:
    arch = dataclasses.replace(ESM2_ARCHS[name], layers=layers)
    path = tmp_path / f"{name}.pt"
    write_random_esm2_checkpoint(name, str(path), num_layers=layers, seed=1)
    ref = fair_esm_meta(path, layers, arch.dim, arch.heads)
    seqs = SEQS[1:3]
    for layer, pooling in ((layers, "mean"), (layers, "cls"), (layers - 1, "mean")):
        model = ModelSpec(name=name, weights=str(path), layer=layer, pooling=pooling)
        emb = esm2_from_checkpoint(path, arch, model, torch.device("cpu"), "fp32")
        assert_equal_embeddings(emb.embed(seqs), reference(ref, seqs, layer, pooling))


def test_random_weights_are_seeded_and_cached(tmp_path: Path) -> None:
    model = ModelSpec(name=SMALL, weights="random")
    a = load_embedder(model, device="cpu", cache_dir=str(tmp_path)).embed(SEQS[:2])
    b = load_embedder(model, device="cpu", cache_dir=str(tmp_path / "other")).embed(SEQS[:2])
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "random" / f"{SMALL}-seed0.pt").is_file()


def test_mismatched_weights_name_layers_and_dim(tmp_path: Path) -> None:
    path = tmp_path / "35m.pt"
    write_random_esm2_checkpoint("esm2_t12_35M_UR50D", str(path), num_layers=1)
    with pytest.raises(ConfigError, match=r"found 1 layers, dim 480; expected 6 layers, dim 320"):
        load_embedder(spec(path), device="cpu")


def test_missing_weights_without_hub_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(ConfigError, match=r"set model.weights") as err:
        load_embedder(ModelSpec(name=SMALL), device="cpu")
    assert "\n" not in str(err.value)


def test_hub_cache_checkpoint_is_used(
    tmp_path: Path, small_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / f"{SMALL}.pt").symlink_to(small_ckpt)  # no -contact-regression.pt beside it
    emb = load_embedder(ModelSpec(name=SMALL), device="cpu")
    direct = load_embedder(spec(small_ckpt), device="cpu")
    np.testing.assert_array_equal(emb.embed(SEQS[:1]), direct.embed(SEQS[:1]))


def test_config_with_numpy_scalars_loads_under_weights_only(
    tmp_path: Path, small_ckpt: Path
) -> None:
    # training configs may carry numpy scalars beside the Namespace: data, so allowed
    data = torch.load(small_ckpt, weights_only=False)
    data["cfg"]["model"].lr = np.float64(4e-4)
    data["cfg"]["optimization"] = {"seed": np.int64(1)}
    path = tmp_path / "np.pt"
    torch.save(data, path)
    np.testing.assert_array_equal(
        load_embedder(spec(path), device="cpu").embed(SEQS[:1]),
        load_embedder(spec(small_ckpt), device="cpu").embed(SEQS[:1]),
    )


def test_bad_layer_missing_file_and_unsafe_pickle(tmp_path: Path, small_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="out of range"):  # the spec refuses it first
        spec(small_ckpt, layer=7)
    unchecked = ModelSpec.model_construct(name=SMALL, weights=str(small_ckpt), layer=7)
    with pytest.raises(ConfigError, match="out of range"):  # and the loader still would
        load_embedder(unchecked, device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        load_embedder(spec(tmp_path / "nope.pt"), device="cpu")
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": Fraction(1, 3)}}, evil)
    with pytest.raises(ConfigError, match=r"fractions.Fraction"):
        load_embedder(spec(evil), device="cpu")


def test_weights_from_s3(s3_bucket, small_ckpt: Path, tmp_path: Path) -> None:
    s3_bucket.client.upload_file(str(small_ckpt), s3_bucket.bucket, "w/8m.pt")
    model = ModelSpec(name=SMALL, weights=s3_bucket.uri("w/8m.pt"))
    emb = load_embedder(model, device="cpu", storage=s3_bucket.storage, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(
        emb.embed(SEQS[:1]), load_embedder(spec(small_ckpt), device="cpu").embed(SEQS[:1])
    )


def test_half_precision_path_on_cpu(small_ckpt: Path, small_ref: torch.nn.Module) -> None:
    # the GPU's code path (half weights, fp32 token-dropout scale and pooling), run on CPU
    emb = load_embedder(spec(small_ckpt), device="cpu", precision="bf16")
    assert emb.precision == "bf16"
    assert cosines(emb.embed(SEQS), reference(small_ref, SEQS, 6)).min() >= 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_gpu(
    small_ckpt: Path, small_ref: torch.nn.Module, precision: str
) -> None:
    emb = load_embedder(spec(small_ckpt), device="cuda", precision=precision)
    assert emb.precision == precision and emb.device.type == "cuda"
    ours = emb.embed(SEQS)
    assert cosines(ours, reference(small_ref, SEQS, 6)).min() >= 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_precision_on_gpu_is_half(small_ckpt: Path) -> None:
    emb = load_embedder(spec(small_ckpt), device="cuda")
    assert emb.precision in ("bf16", "fp16")
