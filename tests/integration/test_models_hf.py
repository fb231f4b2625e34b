"""Hugging Face encoders: a tiny random BertModel + a locally built tokenizer, loaded through
the same snapshot paths as DNABERT-S (directory, .tar.gz, remote-code opt-in)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from embedjob.failures import ConfigError
from embedjob.spec import ModelSpec
from embedjob.worker.models import load_embedder

SEQS = ["ACGTACGTTTGA", "GATTACA", "ACGT" * 30]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_snapshot(path: Path) -> Path:
    """A 2-layer random BERT over single nucleotides, saved with save_pretrained."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, "A", "C", "G", "T", "N"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_snapshot(tmp_path_factory.mktemp("bert"))


def reference(path: Path, seqs: list[str], layer: int, pooling: str) -> np.ndarray:
    """transformers directly: mean over the residue tokens (not CLS/SEP/padding), or CLS."""
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    out = []
    for s in seqs:
        ids = tok(s[:62], return_tensors="pt")["input_ids"]  # 64 positions minus CLS/SEP
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[layer][0]
        out.append(hidden[0] if pooling == "cls" else hidden[1:-1].mean(0))
    return torch.stack(out).numpy()


@pytest.mark.parametrize(("layer", "pooling"), [(-1, "mean"), (-1, "cls"), (1, "mean")])
def test_snapshot_directory_matches_transformers(
    snapshot: Path, tmp_path: Path, layer: int, pooling: str
) -> None:
    model = ModelSpec(name="tiny-bert", weights=str(snapshot), layer=layer, pooling=pooling)
    emb = load_embedder(model, device="cpu", cache_dir=str(tmp_path))
    assert (emb.dim, emb.precision, emb.layer) == (32, "fp32", 2 if layer == -1 else layer)
    ours = emb.embed(SEQS)
    ref = reference(snapshot, SEQS, emb.layer, pooling)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # including CLS/SEP in the mean would give other numbers: the mask matters
    if pooling == "mean":
        assert not np.allclose(ours, reference(snapshot, SEQS, emb.layer, "cls"), atol=1e-3)


def test_tokens_for_is_capped_by_the_model_window(snapshot: Path, tmp_path: Path) -> None:
    emb = load_embedder(ModelSpec(name="x", weights=str(snapshot)), cache_dir=str(tmp_path))
    assert emb.tokens_for(10) == 12 and emb.tokens_for(500) == 64


def test_tarball_is_extracted_and_loaded(snapshot: Path, tmp_path: Path) -> None:
    tarball = tmp_path / "snap.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(snapshot, arcname="tiny-bert")
    model = ModelSpec(name="tiny-bert", weights=f"file://{tarball}")
    emb = load_embedder(model, device="cpu", cache_dir=str(tmp_path / "cache"))
    direct = load_embedder(ModelSpec(name="tiny-bert", weights=str(snapshot)), device="cpu")
    np.testing.assert_array_equal(emb.embed(SEQS), direct.embed(SEQS))


def test_remote_code_needs_opt_in(snapshot: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in snapshot.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "bert_layers.BertModel"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="trustRemoteCode: true"):
        load_embedder(ModelSpec(name="dnabert-s", weights=str(remote)), device="cpu")


def test_offline_hub_without_cache_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"zhihan1996/DNABERT-S.*model\.weights") as err:
        load_embedder(ModelSpec(name="dnabert-s", trust_remote_code=True), device="cpu")
    assert "\n" not in str(err.value)


def test_not_a_snapshot(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_embedder(ModelSpec(name="x", weights=str(tmp_path)), device="cpu")
