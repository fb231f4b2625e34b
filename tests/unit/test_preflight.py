"""Checked in the index step, before any worker starts: DNA given to a protein model, and
sequences that will be truncated (counted, listed by id)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from embedjob import layout
from embedjob.failures import InputError
from embedjob.spec import EmbeddingJobSpec
from embedjob.store import FileStore
from embedjob.summary import load_summary
from embedjob.worker.index import run_index


def spec_for(fasta: Path, out: Path, alphabet: str | None = None,
             **model: object) -> EmbeddingJobSpec:
    doc = {"input": {"uri": str(fasta), "alphabet": alphabet}, "output": {"uri": str(out)},
           "model": {"name": "esm2_t6_8M_UR50D", "weights": "random", **model}}
    return EmbeddingJobSpec.model_validate(doc)


def write(path: Path, seqs: dict[str, str]) -> Path:
    path.write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    return path


def test_dna_given_to_a_protein_model_is_refused(tmp_path: Path) -> None:
    rng = random.Random(3)
    dna = write(tmp_path / "genes.fa",
                {f"g{i}": "".join(rng.choice("ACGT") for _ in range(300)) for i in range(4)})
    with pytest.raises(InputError, match=r"looks like DNA \(100% .*input.alphabet: protein"):
        run_index(spec_for(dna, tmp_path / "out"), FileStore(tmp_path / "out"))
    assert not (tmp_path / "out" / layout.SUMMARY).exists()
    # Said on purpose: embedded as protein.
    spec = spec_for(dna, tmp_path / "ok", alphabet="protein")
    assert run_index(spec, FileStore(tmp_path / "ok")).sequences == 4


def test_proteins_rich_in_acgtn_are_not_mistaken_for_dna(tmp_path: Path) -> None:
    # A real protein is about a quarter A/C/G/T/N; a short peptide is never judged.
    rng = random.Random(5)
    prot = write(tmp_path / "p.fa", {
        "p": "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(400)), "short": "ACGT"})
    assert run_index(spec_for(prot, tmp_path / "out"), FileStore(tmp_path / "out")).sequences == 2


def test_truncated_sequences_are_counted_and_listed(tmp_path: Path) -> None:
    fasta = write(tmp_path / "in.fa", {"long1": "M" * 120, "ok": "M" * 50, "long2": "K" * 101})
    store = FileStore(tmp_path / "out")
    run_index(spec_for(fasta, tmp_path / "out", maxResidues=100, windowOverlap=10), store)
    summary = load_summary(store)
    assert summary is not None and summary.truncated == 2
    assert json.loads(store.read_bytes(layout.TRUNCATED)) == ["long1", "long2"]
    windowed = FileStore(tmp_path / "win")
    run_index(spec_for(fasta, tmp_path / "win", maxResidues=100, longSequences="window",
                       windowOverlap=10), windowed)
    assert load_summary(windowed).truncated == 0  # type: ignore[union-attr]
    assert not windowed.exists(layout.TRUNCATED)


def test_random_weights_for_a_hugging_face_model_are_refused_at_once(tmp_path: Path) -> None:
    from embedjob.failures import ConfigError

    fasta = write(tmp_path / "in.fa", {"a": "MKVL"})
    spec = spec_for(fasta, tmp_path / "out", alphabet="protein",
                    name="facebook/esm2_t6_8M_UR50D")
    with pytest.raises(ConfigError, match="random is for ESM-2 models only"):
        run_index(spec, FileStore(tmp_path / "out"))
