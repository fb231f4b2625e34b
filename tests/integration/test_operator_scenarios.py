"""The real operator on the emulated cluster with REAL worker processes and moto's S3.

Every pod the operator creates runs ``python -m embedjob.cli index|worker|finalize`` as a
local process (tests/integration/cluster.py); faults come from the kubelet (eviction,
OOM kill) or from the worker's own failpoints (``EMBEDJOB_FAILPOINTS`` via spec.template.env).
The model is ESM-2 8M with random weights, so a shard takes seconds on a CPU.
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster, Kubelet
from workerkit import small_fasta

import embedjob
from embedjob import layout
from embedjob.store import open_store

pytestmark = pytest.mark.timeout(300)


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path, s3_bucket):
    """Emulator + kubelet + operator; started after s3_bucket so both inherit its AWS env."""
    c = Cluster(tmp_path).start()
    Kubelet(c).start()
    c.metrics_port = _free_port()
    c.start_operator({"metricsPort": c.metrics_port})
    yield c
    c.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def upload_fasta(s3, tmp: Path, count: int, key: str = "in.fa") -> str:
    path = small_fasta(tmp / key, count)
    s3.client.upload_file(str(path), s3.bucket, key)
    return s3.uri(key)


def job_spec(s3, input_uri: str, prefix: str, shards: int = 3, failpoints: str = "",
             **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "input": {"uri": input_uri},
        "output": {"uri": s3.uri(prefix)},
        "model": {"name": "esm2_t6_8M_UR50D", "weights": "random", "maxTokensPerBatch": 2048},
        "shards": shards,
        "checkpoint": {"everySequences": 6},
        "storage": {"endpointUrl": s3.endpoint, "region": "us-east-1"},
    }
    if failpoints:
        spec["template"] = {"env": [{"name": "EMBEDJOB_FAILPOINTS", "value": failpoints}]}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def wait_phase(c: Cluster, name: str, phase: str, timeout: float = 180) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = c.job(name)
        status = job.get("status") or {}
        if status.get("phase") == phase:
            return job
        if status.get("phase") in ("Failed", "Succeeded") and phase not in ("Failed",
                                                                            "Succeeded"):
            raise AssertionError(f"{name} ended {status.get('phase')}: {status}")
        return None

    try:
        return c.wait_for(check, timeout=timeout)
    except AssertionError:
        print(json.dumps(c.job(name).get("status"), indent=1))
        print((c.workdir / "operator.log").read_text()[-6000:])
        raise


def pod_names(c: Cluster) -> list[str]:
    return sorted(p["metadata"]["name"] for p in c.pods())


def pod(c: Cluster, name: str) -> dict[str, Any]:
    return next(p for p in c.pods() if p["metadata"]["name"] == name)


def pod_env(c: Cluster, name: str) -> dict[str, str]:
    """The env a pod was started with (older attempts are tidied away, the kubelet keeps it)."""
    assert c.kubelet is not None
    manifest = c.kubelet.procs[name][2]
    return {e["name"]: e.get("value", "") for e in manifest["spec"]["containers"][0]["env"]}


def progress(s3, prefix: str, shard: int) -> dict[str, Any]:
    store = open_store(s3.uri(prefix), s3.storage)
    try:
        return json.loads(store.read_bytes(layout.shard_progress(shard)))
    except Exception:
        return {}


def assert_output(s3, prefix: str, fasta: Path, tmp: Path) -> None:
    """Every input id exactly once in the job's output."""
    wanted = [line[1:].split()[0] for line in fasta.read_text().splitlines()
              if line.startswith(">")]
    # One cache per output: embedjob.open names cached shard files by index only.
    cache = tmp / f"cache-{prefix.strip('/')}"
    with embedjob.open(s3.uri(prefix), s3.storage, cache_dir=str(cache)) as out:
        ids = list(out.ids)
        assert len(ids) == len(set(ids)) == len(wanted)
        assert set(ids) == set(wanted)
        assert out.to_numpy().shape == (len(wanted), out.dim)


def reasons(c: Cluster) -> list[str]:
    return [e["reason"] for e in c.events()]


# --- scenarios ------------------------------------------------------------------------------


def test_happy_path_three_shards(cluster: Cluster, s3_bucket, tmp_path: Path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 18)
    cluster.apply_job("happy", job_spec(s3_bucket, uri, "happy/"))
    job = wait_phase(cluster, "happy", "Succeeded")
    status = job["status"]
    assert status["shardsReady"] == "3/3" and status["shardsDone"] == "0-2"
    assert status["progress"]["done"] == status["progress"]["total"] == 18
    assert pod_names(cluster) == ["happy-0-0", "happy-1-0", "happy-2-0", "happy-finalize-0",
                                  "happy-index-0"]
    assert {"Indexing", "Running", "Merging", "Succeeded"} <= set(reasons(cluster))
    assert_output(s3_bucket, "happy/", tmp_path / "in.fa", tmp_path)


def test_eviction_resumes_from_committed_parts(cluster: Cluster, s3_bucket, tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 24)
    spec = job_spec(s3_bucket, uri, "ev/", shards=1,
                    failpoints="stall:batch=2,attempt=0,seconds=4", resources={"gpus": 2})
    cluster.apply_job("ev", spec)
    cluster.wait_for(lambda: progress(s3_bucket, "ev/", 0).get("done", 0) >= 6, timeout=120)
    assert cluster.kubelet is not None
    cluster.kubelet.evict("ev-0-0")
    wait_phase(cluster, "ev", "Succeeded")
    first, term, _ = cluster.kubelet.procs["ev-0-0"]
    assert first.returncode == 143  # checkpointed on SIGTERM
    saved = json.loads(term.read_text())["committed"]  # what the final checkpoint committed
    assert saved >= 6
    resumed = pod(cluster, "ev-0-1")
    assert resumed["metadata"]["annotations"]["embedjob.io/start-done"] == str(saved)
    log = cluster.kubelet.log("ev-0-1")
    assert '"event":"shard.resume"' in log and f'"committed":{saved}' in log
    assert "RetryPreempted" in reasons(cluster)
    assert_output(s3_bucket, "ev/", tmp_path / "in.fa", tmp_path)
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).read().decode()
    lost = [line for line in text.splitlines()
            if line.startswith("embedjob_preemption_gpu_seconds_lost_total ")]
    assert lost and float(lost[0].split()[1]) > 0
    assert 'embedjob_retries_total{failure_type="preempted"} 1.0' in text


def test_oom_kill_retries_with_a_smaller_token_budget(
    cluster: Cluster, s3_bucket, tmp_path: Path
) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    spec = job_spec(s3_bucket, uri, "oom/", shards=1,
                    failpoints="stall:batch=0,attempt=0,seconds=60")
    cluster.apply_job("oom", spec)
    assert cluster.kubelet is not None
    cluster.wait_for(lambda: "oom-0-0" in cluster.kubelet.procs, timeout=120)
    cluster.kubelet.oom_kill("oom-0-0")
    wait_phase(cluster, "oom", "Succeeded")
    assert "EMBEDJOB_MAX_TOKENS_PER_BATCH" not in pod_env(cluster, "oom-0-0")
    assert pod_env(cluster, "oom-0-1")["EMBEDJOB_MAX_TOKENS_PER_BATCH"] == "1024"
    assert "RetryHostOom" in reasons(cluster)
    assert_output(s3_bucket, "oom/", tmp_path / "in.fa", tmp_path)


def test_cuda_error_twice_fails_shard_and_job(cluster: Cluster, s3_bucket, tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    # The same batch crashes both attempts; without quarantine that fails the shard.
    spec = job_spec(s3_bucket, uri, "cuda/", shards=1, failpoints="cuda_error:batch=0",
                    retry={"quarantine": False})
    cluster.apply_job("cuda", spec)
    job = wait_phase(cluster, "cuda", "Failed")
    status = job["status"]
    assert status["shardsFailed"] == "0"
    entry = status["manifest"][0]
    assert entry["state"] == "Failed" and entry["lastFailure"]["type"] == "cuda_error"
    assert entry["failures"] == {"cuda_error": 1, "poison_input": 1}
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True" and "crash the model" in failed["message"]
    assert "retry.quarantine" in failed["message"] and "\n" not in failed["message"]
    events = {e["reason"]: e["message"] for e in cluster.events()}
    assert "RetryCudaError" in events and "crash the model" in events["ShardFailed"]
    assert cluster.kubelet is not None
    affinity = json.dumps(cluster.kubelet.procs["cuda-0-1"][2]["spec"]["affinity"])
    assert '"NotIn"' in affinity and "node-1" in affinity  # away from the failing node
    assert "cuda-finalize-0" not in pod_names(cluster)


def test_bad_input_fails_fast_with_one_line(cluster: Cluster, s3_bucket, tmp_path) -> None:
    path = tmp_path / "dup.fa"
    path.write_text(">a\nMKTAYIAK\n>b\nMKVLAAGI\n>a\nMSTNPKPQ\n")
    s3_bucket.client.upload_file(str(path), s3_bucket.bucket, "dup.fa")
    cluster.apply_job("dup", job_spec(s3_bucket, s3_bucket.uri("dup.fa"), "dup/"))
    job = wait_phase(cluster, "dup", "Failed", timeout=120)
    failed = {c["type"]: c for c in job["status"]["conditions"]}["Failed"]
    assert "duplicate" in failed["message"].lower() and "\n" not in failed["message"]
    assert "Traceback" not in failed["message"]
    assert pod_names(cluster) == ["dup-index-0"]  # no retry of an input error


def test_operator_restart_mid_job_duplicates_nothing(
    cluster: Cluster, s3_bucket, tmp_path: Path
) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 18)
    spec = job_spec(s3_bucket, uri, "rs/", failpoints="stall:batch=1,attempt=0,seconds=3")
    cluster.apply_job("rs", spec)
    cluster.wait_for(lambda: {"rs-0-0", "rs-1-0", "rs-2-0"} <= set(pod_names(cluster)),
                     timeout=120)
    cluster.stop_operator(signal.SIGKILL)
    cluster.start_operator({"metricsPort": 0})
    wait_phase(cluster, "rs", "Succeeded")
    assert pod_names(cluster) == ["rs-0-0", "rs-1-0", "rs-2-0", "rs-finalize-0", "rs-index-0"]
    assert_output(s3_bucket, "rs/", tmp_path / "in.fa", tmp_path)


def test_suspend_and_resume(cluster: Cluster, s3_bucket, tmp_path: Path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 36)
    # Attempt 0 sleeps 2 s before every batch: slow enough to be caught mid-shard.
    spec = job_spec(s3_bucket, uri, "sus/", shards=2, failpoints="stall:attempt=0,seconds=2")
    cluster.apply_job("sus", spec)
    cluster.wait_for(lambda: all(progress(s3_bucket, "sus/", s).get("done", 0) > 0
                                 for s in (0, 1)), timeout=120)
    cluster.patch_spec("sus", {"suspend": True})
    job = wait_phase(cluster, "sus", "Suspended")
    # Deleted gracefully: gone once they have checkpointed (the index pod stays, Succeeded).
    cluster.wait_for(lambda: pod_names(cluster) == ["sus-index-0"], timeout=60)
    assert cluster.kubelet is not None
    assert [cluster.kubelet.procs[f"sus-{s}-0"][0].returncode for s in (0, 1)] == [143, 143]
    assert {c["type"]: c for c in job["status"]["conditions"]}["Suspended"]["status"] == "True"
    saved = {s: progress(s3_bucket, "sus/", s)["done"] for s in (0, 1)}
    cluster.patch_spec("sus", {"suspend": False})
    wait_phase(cluster, "sus", "Succeeded")
    for s in (0, 1):
        assert pod(cluster, f"sus-{s}-1")["metadata"]["annotations"].get(
            "embedjob.io/start-done") == str(saved[s])
    assert_output(s3_bucket, "sus/", tmp_path / "in.fa", tmp_path)


def test_two_jobs_side_by_side(cluster: Cluster, s3_bucket, tmp_path: Path) -> None:
    """Also: fewer sequences than spec.shards -> the index's effective shard count."""
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    few = upload_fasta(s3_bucket, tmp_path, 2, key="few.fa")
    cluster.apply_job("left", job_spec(s3_bucket, uri, "left/", shards=1))
    cluster.apply_job("right", job_spec(s3_bucket, few, "right/", shards=4))
    assert wait_phase(cluster, "left", "Succeeded")["status"]["shardsReady"] == "1/1"
    assert wait_phase(cluster, "right", "Succeeded")["status"]["shardsReady"] == "2/2"
    assert_output(s3_bucket, "left/", tmp_path / "in.fa", tmp_path)
    assert_output(s3_bucket, "right/", tmp_path / "few.fa", tmp_path)
    assert pod_names(cluster) == ["left-0-0", "left-finalize-0", "left-index-0", "right-0-0",
                                  "right-1-0", "right-finalize-0", "right-index-0"]
