"""What a bioinformatician tries with ``embedjob run`` / ``embedjob.open`` / ``embedjob inspect``.

The CLI runs as a subprocess, as a user runs it. Most of these pin bugs found by trying
the tool by hand.
"""

from __future__ import annotations

import gzip
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_local_run import one_line_error, run_cli, small_spec, status, write_job
from workerkit import REPO, small_fasta

import embedjob

COUNT = 8


@pytest.fixture(scope="module")
def fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fasta(tmp_path_factory.mktemp("in") / "in.fa", COUNT)


@pytest.fixture(scope="module")
def finished(fasta: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished two-shard job with a merged file, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "out"
    spec = small_spec(fasta, out, output={"merge": True})
    result = run_cli("run", str(write_job(tmp, spec, "finished")))
    assert result.returncode == 0, result.stderr
    return out


def records(path: Path) -> list[tuple[str, str]]:
    recs: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            recs.append((line[1:].split()[0], ""))
        elif line.strip():
            recs[-1] = (recs[-1][0], recs[-1][1] + line.strip())
    return recs


def fasta_text(recs: list[tuple[str, str]], newline: str, lower: bool, stop: bool) -> str:
    out = []
    for rid, seq in recs:
        seq = (seq.lower() if lower else seq) + ("*" if stop else "")
        lines = [seq[i : i + 60] for i in range(0, len(seq), 60)]
        out.append(f">{rid} some description{newline}" + newline.join(lines) + newline)
    return "".join(out)


def vectors(out: Path) -> dict[str, np.ndarray]:
    with embedjob.open(str(out)) as emb:
        return {i: v for ids, block in emb.batches(3) for i, v in zip(ids, block, strict=True)}


def events(stderr: str) -> list[str]:
    found = []
    for line in stderr.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "job.event":
            found.append(doc["message"])
    return found


# --- behaviours that work -------------------------------------------------------------------


def test_every_id_once_and_reader_agrees_with_plain_h5py(finished: Path, fasta: Path) -> None:
    want = [rid for rid, _ in records(fasta)]
    with embedjob.open(str(finished)) as emb:
        ids = emb.ids
        assert sorted(ids) == sorted(want) and len(emb) == COUNT
        matrix = emb.to_numpy()
        assert matrix.shape == (COUNT, 320) and np.isfinite(matrix).all()
        assert want[3] in emb and "not-an-id" not in emb
        with pytest.raises(KeyError):
            emb["not-an-id"]
        np.testing.assert_array_equal(emb[ids[5]], matrix[5])
        streamed = np.concatenate([b for _, b in emb.batches(3)])
        np.testing.assert_array_equal(streamed, matrix)
    with h5py.File(finished / "embeddings.h5") as merged:
        merged_ids = list(merged["ids"].asstr()[:])
        assert merged_ids == ids
        np.testing.assert_array_equal(merged["embeddings"][:], matrix)


def test_messy_input_gives_the_same_embeddings_as_clean_input(
    finished: Path, fasta: Path, tmp_path: Path
) -> None:
    """Soft-masked, CRLF, trailing stops, gzip without a .gz name, split over input.uris."""
    recs = records(fasta)
    first = tmp_path / "part1.fasta"  # gzip bytes behind a plain name
    first.write_bytes(gzip.compress(fasta_text(recs[:3], "\n", lower=True, stop=True).encode()))
    second = tmp_path / "part2.fa"
    second.write_bytes(fasta_text(recs[3:], "\r\n", lower=False, stop=True).encode())
    out = tmp_path / "out"
    spec = small_spec(fasta, out, shards=1)
    spec["input"] = {"uris": [str(first), str(second)]}
    result = run_cli("run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, result.stderr
    clean, messy = vectors(finished), vectors(out)
    assert sorted(messy) == sorted(clean)
    for rid, vec in clean.items():
        np.testing.assert_allclose(messy[rid], vec, atol=1e-5)


def test_a_killed_worker_is_retried_and_the_output_is_complete(fasta: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1, checkpoint={"everySequences": 2}))
    result = run_cli("run", str(job), env={"EMBEDJOB_FAILPOINTS": "die:batch=1,attempt=0"})
    assert result.returncode == 0, result.stderr
    assert any("attempt 1 started" in e for e in events(result.stderr)), result.stderr
    assert status(out)["phase"] == "Succeeded"
    with embedjob.open(str(out)) as emb:
        assert len(emb) == COUNT and len(set(emb.ids)) == COUNT


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["spec"]["model"].update(poolng="cls"), "spec.model.poolng"),
        (lambda d: d["metadata"].pop("name"), "metadata.name"),
        (lambda d: d["spec"]["input"].update(uri="/nonexistent/x.fa"), "/nonexistent/x.fa"),
    ],
    ids=["typo", "no-name", "missing-input"],
)
def test_a_broken_job_is_one_line(edit: Any, expected: str, fasta: Path, tmp_path: Path) -> None:
    import yaml

    job = write_job(tmp_path, small_spec(fasta, tmp_path / "out"))
    doc = yaml.safe_load(job.read_text())
    edit(doc)
    job.write_text(yaml.safe_dump(doc))
    assert expected in one_line_error(run_cli("run", str(job)))


def test_verify_catches_a_corrupt_shard_file(finished: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    shard = copy / "shards" / "00000" / "embeddings.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    check = run_cli("inspect", str(copy), "--verify")
    assert check.returncode == 1 and "shards/00000/embeddings.h5" in check.stdout


# --- bugs -------------------------------------------------------------------------------------


def test_parallelism_caps_the_shards_running_at_once(fasta: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, small_spec(fasta, tmp_path / "out", parallelism=1))
    result = run_cli("run", str(job), "--workers", "2")
    assert result.returncode == 0, result.stderr
    seen = events(result.stderr)
    assert seen.index("shard 1: attempt 0 started") > seen.index("shard 0: done"), seen


def test_iterating_the_embeddings_gives_the_ids(finished: Path) -> None:
    with embedjob.open(str(finished)) as emb:
        assert list(emb) == emb.ids


def test_verify_catches_a_corrupt_merged_file(finished: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    merged = copy / "embeddings.h5"
    data = bytearray(merged.read_bytes())
    data[-100] ^= 0xFF
    merged.write_bytes(bytes(data))
    check = run_cli("inspect", str(copy), "--verify")
    assert check.returncode == 1 and "embeddings.h5" in check.stdout


def test_fixing_an_out_of_range_layer_and_rerunning_works(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bad = run_cli("run", str(write_job(tmp_path, small_spec(fasta, out, shards=1,
                                                            model={"layer": 12}))))
    assert bad.returncode != 0
    fixed = run_cli("run", str(write_job(tmp_path, small_spec(fasta, out, shards=1,
                                                              model={"layer": 5}))))
    assert fixed.returncode == 0, fixed.stderr
    with embedjob.open(str(out)) as emb:
        assert len(emb) == COUNT and emb.manifest["layer"] == 5


def test_asking_for_the_merged_file_afterwards(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_cli("run", str(write_job(tmp_path, small_spec(fasta, out, shards=1))))
    assert first.returncode == 0, first.stderr
    again = run_cli("run", str(write_job(tmp_path, small_spec(fasta, out, shards=1,
                                                              output={"merge": True}))))
    if again.returncode == 0:
        assert (out / "embeddings.h5").exists(), again.stderr
    else:
        assert "output.merge" in one_line_error(again)


def test_a_different_dtype_into_a_half_done_output(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    failing = small_spec(fasta, out, retry={"cudaError": 0, "quarantine": False})
    first = run_cli("run", str(write_job(tmp_path, failing)), "--workers", "1",
                    env={"EMBEDJOB_FAILPOINTS": "cuda_error:shard=1"})
    assert first.returncode == 1 and (out / "shards" / "00000" / "done.json").exists()
    again = run_cli("run", str(write_job(tmp_path, small_spec(fasta, out,
                                                              output={"dtype": "float16"}))))
    if again.returncode != 0:  # refusing is a fine answer
        assert "dtype" in one_line_error(again)
        return
    dtypes = set()
    for k in (0, 1):
        with h5py.File(out / "shards" / f"{k:05d}" / "embeddings.h5") as h5:
            dtypes.add(str(h5["embeddings"].dtype))
    assert dtypes == {"float16"}


def test_an_unwritable_output_names_the_fix(fasta: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, small_spec(fasta, "/proc/embedjob-qa/out"))
    line = one_line_error(run_cli("run", str(job)))
    assert "output.uri" in line


def test_crd_to_an_unwritable_path_is_one_line() -> None:
    one_line_error(run_cli("crd", "-o", "/proc/embedjob-qa/crd.yaml"))


def test_inspect_into_a_closed_pipe_has_no_traceback(finished: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "embedjob.cli", "inspect", str(finished),
                           "--json"], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write_end)
    assert "Traceback" not in proc.stderr, proc.stderr


def _run_on_a_terminal(job: Path) -> tuple[int, str]:
    """``embedjob run`` with stderr on a pseudo-terminal (the live view); its screen text."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "embedjob.cli", "run", str(job)], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # the pty buffer is small: read while the job runs
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    code = proc.wait(timeout=300)
    reader.join(timeout=30)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_the_live_view_ends_on_the_finished_state(fasta: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, small_spec(fasta, tmp_path / "out", shards=1))
    code, screen = _run_on_a_terminal(job)
    assert code == 0, screen[-2000:]
    assert "Succeeded" in screen
    frames = re.findall(r"(\d+)/(\d+) shards done", screen)
    assert frames and frames[-1] == ("1", "1"), frames[-3:]
