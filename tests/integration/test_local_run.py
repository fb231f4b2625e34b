"""``embedjob run`` end to end: the CLI as a user runs it, real worker processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml
from workerkit import REPO, merged, small_fasta, spec_doc

import embedjob


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedjob.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def write_job(tmp: Path, spec: dict[str, Any], name: str = "test-job") -> Path:
    doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
           "metadata": {"name": name}, "spec": spec}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def small_spec(fasta: Path, out: Path | str, **extra: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {"shards": 2, "checkpoint": {"everySequences": 6},
                                "retry": {"backoffSeconds": 0}}
    return merged(spec_doc(str(fasta), str(out), **defaults), extra)


def status(out: Path) -> dict[str, Any]:
    return json.loads((out / "status.json").read_text())


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("embedjob: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fasta(tmp_path_factory.mktemp("in") / "in.fa", 24)


def test_quickstart_as_the_readme_gives_it(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    out = tmp_path / "quickstart"
    doc["spec"]["output"]["uri"] = str(out)
    job = tmp_path / "quickstart.yaml"
    job.write_text(yaml.safe_dump(doc))
    result = run_cli("run", str(job), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert status(out)["phase"] == "Succeeded"
    check = run_cli("inspect", str(out), "--verify")
    assert check.returncode == 0 and "verified" in check.stdout, check.stdout + check.stderr
    with embedjob.open(str(out)) as emb:
        assert len(emb) == 300 and emb.dim == 320
        ids = emb.ids
        assert len(set(ids)) == 300
        assert emb[ids[7]].shape == (320,)
    with h5py.File(out / "embeddings.h5") as merged:
        assert merged["embeddings"].shape == (300, 320)
        assert merged.attrs["model"] == "esm2_t6_8M_UR50D"
    again = run_cli("run", str(job))
    assert again.returncode == 0 and "already complete" in again.stderr


def test_different_input_into_the_same_output_is_refused(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("run", str(write_job(tmp_path, small_spec(fasta, out)))).returncode == 0
    other = small_fasta(tmp_path / "other.fa", 10)
    line = one_line_error(run_cli("run", str(write_job(tmp_path, small_spec(other, out), "b"))))
    assert "different input" in line and "output.uri" in line


def test_gpu_oom_is_retried_with_a_smaller_budget(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1))
    result = run_cli("run", str(job), env={"EMBEDJOB_FAILPOINTS": "gpu_oom:batch=1,attempt=0"})
    assert result.returncode == 0, result.stderr
    assert "gpu_oom" in result.stderr and status(out)["phase"] == "Succeeded"
    with embedjob.open(str(out)) as emb:
        assert len(emb) == 24


def test_persistent_cuda_error_fails_the_job_with_the_reason(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1, retry={"quarantine": False}))
    result = run_cli("run", str(job), env={"EMBEDJOB_FAILPOINTS": "cuda_error:batch=0"})
    assert result.returncode == 1
    st = status(out)
    assert st["phase"] == "Failed" and st["shardsFailed"] == "0"
    entry = st["manifest"][0]
    assert entry["lastFailure"]["type"] == "cuda_error"
    assert "crash the model" in st["message"] and "retry.quarantine" in st["message"]
    assert not (out / "manifest.json").exists()


def test_a_sequence_that_always_crashes_is_quarantined(fasta: Path, tmp_path: Path) -> None:
    poison = next(ln[1:].split()[0] for ln in fasta.read_text().splitlines()
                  if ln.startswith(">"))
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1))
    result = run_cli("run", str(job), env={"EMBEDJOB_FAILPOINTS": f"cuda_error:id={poison}"})
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quarantined"] == [poison]
    with embedjob.open(str(out)) as emb:
        assert len(emb) == 23 and poison not in emb


def test_nan_at_half_precision_is_retried_at_a_safer_one(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1, model={"precision": "bf16"}))
    result = run_cli("run", str(job), env={"EMBEDJOB_FAILPOINTS": "nan:batch=1,attempt=0"})
    assert result.returncode == 0, result.stderr
    assert "numerical" in result.stderr
    with h5py.File(out / "shards" / "00000" / "embeddings.h5") as h5:
        assert h5.attrs["precision"] == "fp32"


def test_a_stuck_worker_is_replaced(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = small_spec(fasta, out, shards=1, checkpoint={"everySeconds": 1})
    result = run_cli("run", str(write_job(tmp_path, spec)), "--stuck-after", "3",
                     env={"EMBEDJOB_FAILPOINTS": "stall:batch=2,attempt=0,seconds=600"})
    assert result.returncode == 0, result.stderr
    assert "stuck" in result.stderr
    with embedjob.open(str(out)) as emb:
        assert len(emb) == 24


def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(fasta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path, small_spec(fasta, out, shards=1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedjob.cli", "run", str(job)], cwd=REPO, text=True,
        stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1",
                                     "EMBEDJOB_FAILPOINTS": "stall:batch=3,seconds=30"},
    )
    progress = out / "shards" / "00000" / "progress.json"
    deadline = time.monotonic() + 240
    while not progress.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert status(out)["phase"] == "Suspended"
    saved = json.loads(progress.read_text())["done"]
    assert saved > 0
    resumed = run_cli("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    with embedjob.open(str(out)) as emb:
        assert len(emb) == 24 and len(set(emb.ids)) == 24


def test_output_on_s3(fasta: Path, tmp_path: Path, s3_bucket) -> None:
    storage = {"endpointUrl": s3_bucket.endpoint}
    spec = small_spec(fasta, s3_bucket.uri("jobs/one/"), storage=storage)
    result = run_cli("run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, result.stderr
    with embedjob.open(s3_bucket.uri("jobs/one/"), s3_bucket.storage) as emb:
        assert len(emb) == 24 and len(set(emb.ids)) == 24
    check = run_cli("inspect", s3_bucket.uri("jobs/one/"), "--verify",
                    "--endpoint-url", s3_bucket.endpoint)
    assert check.returncode == 0, check.stdout + check.stderr


def test_s3_access_denied_is_one_line(fasta: Path, tmp_path: Path, s3_denied) -> None:
    spec = small_spec(fasta, s3_denied.uri("x/"), storage={"endpointUrl": s3_denied.endpoint})
    line = one_line_error(run_cli("run", str(write_job(tmp_path, spec))))
    assert "denied" in line.lower() or "credentials" in line.lower()


BAD_FASTA = {
    "empty": (b"", "empty"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "FASTA"),
    "no header": (b"MKV\n", ">"),
    "duplicate ids": (b">a\nMKV\n>b\nMKL\n>a\nMKA\n", "duplicate id 'a'"),
    "empty sequence": (b">a\n>b\nMKV\n", "empty"),
    "invalid residue": (b">a\nMKV\n>b\nMK1V\n", "'1'"),
}


@pytest.mark.parametrize("case", list(BAD_FASTA))
def test_bad_input_is_one_clear_line(case: str, tmp_path: Path) -> None:
    content, expected = BAD_FASTA[case]
    path = tmp_path / "bad.fa"
    path.write_bytes(content)
    job = write_job(tmp_path, small_spec(path, tmp_path / "out"))
    line = one_line_error(run_cli("run", str(job)))
    assert expected in line, line
    if case == "invalid residue":
        assert "b" in line and "position 3" in line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"shards": 0}, "spec.shards"),
        ({"shard": 2}, "unknown field"),
        ({"model": {"name": "esm2_t6_8M"}}, "unknown model"),
        ({"model": {"pooling": "max"}}, "spec.model.pooling"),
        ({"input": {"uri": "/does/not/exist.fa"}}, "not found"),
    ],
)
def test_bad_job_is_one_clear_line(
    fasta: Path, tmp_path: Path, change: dict, expected: str
) -> None:
    spec = small_spec(fasta, tmp_path / "out")
    for key, value in change.items():
        if isinstance(value, dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    line = one_line_error(run_cli("run", str(write_job(tmp_path, spec))))
    assert expected in line, line


def test_weights_of_another_architecture_fail_the_job_clearly(fasta: Path, tmp_path: Path) -> None:
    from embedjob.worker.models import write_random_esm2_checkpoint

    weights = tmp_path / "esm2_t12_35M_UR50D.pt"
    write_random_esm2_checkpoint("esm2_t12_35M_UR50D", str(weights), num_layers=1)
    out = tmp_path / "out"
    spec = small_spec(fasta, out, shards=1, model={"weights": str(weights)})
    result = run_cli("run", str(write_job(tmp_path, spec)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    st = status(out)
    assert st["phase"] == "Failed" and "input_error" in json.dumps(st)


def test_missing_job_file_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(run_cli("run", str(tmp_path / "nope.yaml")))
    assert "cannot read job file" in line
