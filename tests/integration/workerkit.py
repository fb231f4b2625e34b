"""Helpers to run real worker processes against a real store (local disk or moto's S3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedjob import layout
from embedjob.spec import EmbeddingJobSpec, dump_spec
from embedjob.store import Store, open_store
from embedjob.worker.index import run_index

REPO = Path(__file__).resolve().parents[2]
PROTEINS = REPO / "examples" / "data" / "proteins.fa"


def small_fasta(path: Path, count: int) -> Path:
    """The first ``count`` proteins of the example set."""
    records, current = [], []
    for line in PROTEINS.read_text().splitlines():
        if line.startswith(">"):
            if len(records) == count:
                break
            current = [line]
            records.append(current)
        else:
            current.append(line)
    path.write_text("\n".join(line for rec in records for line in rec) + "\n")
    return path


def spec_doc(input_uri: str, output_uri: str, **overrides: Any) -> dict[str, Any]:
    """A small test job's spec (8M model, random weights); dict overrides merge one level."""
    doc: dict[str, Any] = {
        "input": {"uri": input_uri},
        "output": {"uri": output_uri},
        "model": {"name": "esm2_t6_8M_UR50D", "weights": "random", "maxTokensPerBatch": 2048},
        "shards": 1,
        "checkpoint": {"everySequences": 8},
    }
    return merged(doc, overrides)


def merged(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``overrides`` applied, dict values merged one level deep."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    return doc


def make_spec(input_uri: str, output_uri: str, **overrides: Any) -> EmbeddingJobSpec:
    return EmbeddingJobSpec.model_validate(spec_doc(input_uri, output_uri, **overrides))


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    termination_log: Path
    log: Path

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def message(self) -> dict[str, Any]:
        text = self.termination_log.read_text() if self.termination_log.exists() else ""
        return json.loads(text) if text else {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(spec: EmbeddingJobSpec, tmp: Path, shard: int = 0, attempt: int = 0,
                 env: Mapping[str, str] | None = None) -> Worker:
    tlog = tmp / f"term-{shard}-{attempt}-{time.monotonic_ns()}"
    out = tmp / f"log-{shard}-{attempt}-{time.monotonic_ns()}"
    full_env = {
        **os.environ,
        "EMBEDJOB_SPEC": json.dumps(dump_spec(spec)),
        "EMBEDJOB_SHARD": str(shard),
        "EMBEDJOB_ATTEMPT": str(attempt),
        "EMBEDJOB_TERMINATION_LOG": str(tlog),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    with open(out, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "embedjob.cli", "worker"], env=full_env,
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    return Worker(proc, tlog, out)


def index(spec: EmbeddingJobSpec) -> Store:
    store = open_store(spec.output.uri, spec.storage)
    run_index(spec, store)
    return store


def committed(store: Store, shard: int = 0) -> int:
    try:
        return int(json.loads(store.read_bytes(layout.shard_progress(shard)))["done"])
    except Exception:
        return 0


def wait_for_commits(store: Store, minimum: int, proc: subprocess.Popen[bytes],
                     timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = committed(store)
        if n >= minimum or proc.poll() is not None:
            return n
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {minimum} sequences committed in {timeout}s")


def terminate(worker: Worker, sig: int = signal.SIGTERM) -> None:
    worker.proc.send_signal(sig)


def read_shard(store: Store, tmp: Path, shard: int = 0) -> tuple[list[str], np.ndarray]:
    import h5py

    local = tmp / f"read-{shard}-{time.monotonic_ns()}.h5"
    store.download_file(layout.shard_output(shard), str(local))
    with h5py.File(local, "r") as h5:
        return list(h5["ids"].asstr()[:]), h5["embeddings"][:]


def uninterrupted(fasta: Path, tmp: Path) -> dict[str, np.ndarray]:
    """Embeddings by id from one uninterrupted worker on local disk: what every interrupted
    or faulty run must reproduce."""
    spec = make_spec(str(fasta), str(tmp / "out"))
    store = index(spec)
    worker = start_worker(spec, tmp)
    assert worker.wait() == 0, worker.output()
    ids, emb = read_shard(store, tmp)
    assert sorted(ids) == sorted(set(ids)), "an id twice in an uninterrupted run"
    return dict(zip(ids, emb, strict=True))
