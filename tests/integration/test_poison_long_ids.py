"""Poison-batch bisection in ``embedjob run`` when the batch's ids do not fit in the 4 KiB
termination message: the batch is named by its run of positions in the shard's batch order,
so the poison sequence is still isolated and quarantined, and the history stays small."""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_local_run import run_cli, small_spec, status, write_job
from workerkit import small_fasta

import embedjob
from embedjob.failures import MAX_TERMINATION_MESSAGE

N = 24
ID_LENGTH = 1000  # the short sequences batch 7 at a time here: 7 kB of ids per batch


def long_id_fasta(path: Path) -> list[str]:
    """The first N example proteins, each renamed to a 1000-character id."""
    small_fasta(path, N)
    ids: list[str] = []
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            ids.append(f"p{len(ids):02d}_" + "x" * (ID_LENGTH - 4))
            line = ">" + ids[-1]
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return ids


def test_a_poison_sequence_among_long_ids_is_bisected_and_quarantined(tmp_path: Path) -> None:
    fasta = tmp_path / "long-ids.fa"
    ids = long_id_fasta(fasta)
    poison = ids[12]  # 92 residues: batched with the six other shortest ones
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1))
    result = run_cli("run", str(job), env={"EMBEDJOB_FAILPOINTS": f"cuda_error:id={poison}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "crashed twice; running its sequences one by one" in result.stderr
    assert "crashes the model; quarantined" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quarantined"] == [poison]
    with embedjob.open(str(out)) as emb:
        assert len(emb) == N - 1 and poison not in emb and set(emb.ids) == set(ids) - {poison}
    # The history named the batch by one run of positions, not by seven 1000-character ids.
    found = re.search(r"the batch at positions (\d+)-(\d+) crashed twice", result.stderr)
    assert found, result.stderr[-3000:]
    size = int(found[2]) - int(found[1]) + 1
    assert size >= 5 and size * ID_LENGTH > MAX_TERMINATION_MESSAGE
    assert status(out)["phase"] == "Succeeded"
