"""Honest completion: damaged shard files are found, reported in one line and re-embedded,
never called complete (real `embedjob` processes on a local output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from workerkit import REPO, index, make_spec, small_fasta, spec_doc, start_worker

import embedjob
from embedjob import layout
from embedjob.repair import DamagedOutput, damaged_shards
from embedjob.store import open_store

N = 10


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedjob.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("embedjob: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def job_file(tmp: Path, fasta: Path, out: Path) -> Path:
    spec: dict[str, Any] = spec_doc(str(fasta), str(out), shards=2,
                                    retry={"backoffSeconds": 0})
    doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
           "metadata": {"name": "repair"}, "spec": spec}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def embeddings(out: Path) -> dict[str, np.ndarray]:
    with embedjob.open(str(out)) as emb:
        return {i: emb[i] for i in emb.ids}


def shard_rows(path: Path) -> tuple[list[str], np.ndarray]:
    import h5py

    with h5py.File(path, "r") as h5:
        return list(h5["ids"].asstr()[:]), h5["embeddings"][:]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def fasta(tmp_path: Path) -> Path:
    return small_fasta(tmp_path / "in.fa", N)


def test_finalize_rehashes_and_resets_a_damaged_shard(fasta: Path, tmp_path: Path) -> None:
    """Done but not finalized, then a bit flips: finalize refuses in one line and resets that
    shard; the next run embeds it again and the output is what it was."""
    out = tmp_path / "out"
    job = job_file(tmp_path, fasta, out)
    spec = make_spec(str(fasta), str(out), shards=2)
    index(spec)
    for shard in (0, 1):
        assert start_worker(spec, tmp_path, shard=shard).wait() == 0
    good = shard_rows(out / layout.shard_output(1))
    flip_a_byte(out / layout.shard_output(1))
    error = one_line_error(cli("finalize", str(job)))
    assert "shard 1" in error and "does not match its done record" in error and "reset" in error
    assert not (out / layout.shard_done(1)).exists() and (out / layout.shard_done(0)).exists()
    assert not (out / layout.MANIFEST).exists()
    run = cli("run", str(job))
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["sequences"] == N and manifest["weights"] == "random:seed=0"
    again = shard_rows(out / layout.shard_output(1))
    assert again[0] == good[0]
    np.testing.assert_allclose(again[1], good[1], rtol=1e-6)


def test_run_on_a_finished_output_repairs_only_damaged_shards(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = job_file(tmp_path, fasta, out)
    assert cli("run", str(job)).returncode == 0
    reference = embeddings(out)
    shard0 = (out / layout.shard_output(0)).stat()

    # Truncated: every reader says so in one line; run re-embeds that shard only.
    path = out / layout.shard_output(1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DamagedOutput) as info:
        embeddings(out)
    assert "damaged or truncated" in str(info.value) and "\n" not in str(info.value)
    inspect = cli("inspect", str(out), "--verify")
    assert inspect.returncode != 0 and "Traceback" not in inspect.stderr + inspect.stdout
    assert damaged_shards(open_store(str(out)), 2) == [
        (1, f"shard 1: {layout.shard_output(1)} is {path.stat().st_size} bytes, its done record "
            f"says {path.stat().st_size + 100}")]
    rerun = cli("run", str(job))
    assert rerun.returncode == 0, rerun.stderr
    assert "shard 1:" in rerun.stderr and "re-embedding it" in rerun.stderr
    assert "already complete" not in rerun.stderr
    assert (out / layout.shard_output(0)).stat().st_ino == shard0.st_ino  # untouched
    after = embeddings(out)
    assert after.keys() == reference.keys()
    for key, row in reference.items():
        np.testing.assert_allclose(after[key], row, rtol=1e-6)

    # A bit flip keeps the size: found with --verify (checksums), not by the quick check.
    flip_a_byte(out / layout.shard_output(0))
    assert damaged_shards(open_store(str(out)), 2) == []
    assert cli("run", str(job)).returncode == 0  # sizes agree: complete, as far as it checks
    verified = cli("run", str(job), "--verify")
    assert verified.returncode == 0, verified.stderr
    assert "shard 0:" in verified.stderr and "sha256" in verified.stderr
    assert cli("inspect", str(out), "--verify").returncode == 0
    assert embeddings(out).keys() == reference.keys()

    # Deleted: found at once.
    (out / layout.shard_output(1)).unlink()
    assert damaged_shards(open_store(str(out)), 2)[0][1].endswith("is missing")
