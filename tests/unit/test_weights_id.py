"""Model identity: what the weights are, recorded in the index and refused when it changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedjob.failures import ConfigError
from embedjob.spec import ModelSpec
from embedjob.weights_id import file_sha256, weights_identity

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMBEDJOB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "cache"


def test_random_file_and_missing(tmp_path: Path) -> None:
    assert weights_identity(ModelSpec(weights="random")) == "random:seed=0"
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"weights one")
    first = weights_identity(ModelSpec(weights=str(ckpt)))
    assert first.startswith("sha256:") and len(first) == 7 + 64
    assert weights_identity(ModelSpec(weights=f"file://{ckpt}")) == first
    ckpt.write_bytes(b"weights two")  # same path, new content: a new identity
    assert weights_identity(ModelSpec(weights=str(ckpt))) != first
    with pytest.raises(ConfigError, match="does not exist"):
        weights_identity(ModelSpec(weights=str(tmp_path / "nope.pt")))


def test_hash_is_cached_per_file_version(tmp_path: Path, cache: Path) -> None:
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"x" * 1000)
    digest = file_sha256(ckpt)
    table = json.loads((cache / "weights-sha256.json").read_text())
    assert list(table.values()) == [digest]


def test_snapshot_directory_and_hub_revision(tmp_path: Path) -> None:
    snap = tmp_path / "hf" / "models--org--enc" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"tensor")
    ident = weights_identity(ModelSpec(name="org/enc", weights=str(snap)))
    assert ident.startswith("sha256:") and ident.endswith("@abc123")
    (snap / "model.safetensors").write_bytes(b"other tensor")
    assert weights_identity(ModelSpec(name="org/enc", weights=str(snap))) != ident
    assert weights_identity(ModelSpec(name="org/enc")) == "hub:org/enc"
    refs = tmp_path / "hf" / "models--org--enc" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123\n")
    assert weights_identity(ModelSpec(name="org/enc")) == "hub:org/enc@abc123"


def _index(tmp: Path, weights: str) -> subprocess.CompletedProcess[str]:
    fasta = tmp / "in.fa"
    fasta.write_text(">a\nMKVL\n>b\nMKKL\n")
    doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
           "metadata": {"name": "ident"},
           "spec": {"input": {"uri": str(fasta)}, "output": {"uri": str(tmp / "out")},
                    "model": {"name": "esm2_t6_8M_UR50D", "weights": weights}}}
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    return subprocess.run([sys.executable, "-m", "embedjob.cli", "index", str(job)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_different_weights_into_the_same_output_are_refused(tmp_path: Path) -> None:
    assert _index(tmp_path, "random").returncode == 0
    summary = json.loads((tmp_path / "out" / "index" / "summary.json").read_text())
    assert summary["weights"] == "random:seed=0"
    assert _index(tmp_path, "random").returncode == 0  # the same weights: fine
    ckpt = tmp_path / "other.pt"
    ckpt.write_bytes(b"another model")
    refused = _index(tmp_path, str(ckpt))
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    errors = [ln for ln in refused.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1, refused.stderr
    assert "weights 'random:seed=0' -> 'sha256:" in errors[0]
    assert "choose a new output.uri" in errors[0]
