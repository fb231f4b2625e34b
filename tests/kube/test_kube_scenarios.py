"""The operator's scenarios on a REAL API server, with REAL worker processes and moto's S3.

One operator per module (the chart's ServiceAccount and RBAC, watching the module's
namespace), one job per test. Pods are bound, run and reported by the test kubelet
(tests/kube/kubelet.py); faults come from the Eviction API, pods/status, the kubelet (OOM
kill) or the worker's own failpoints (``EMBEDJOB_FAILPOINTS`` via spec.template.env).
The model is ESM-2 8M with random weights, so a shard takes seconds on a CPU.
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubelet import Kubelet
from operatorkit import (
    Jobs,
    assert_output,
    condition,
    fasta_ids,
    job_spec,
    module_jobs,
    progress,
    upload_fasta,
    wait_for,
)

import embedjob
from embedjob import layout
from embedjob.store import open_store

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def jobs(control_plane, admin_api, crd_installed, kubelet, tmp_path_factory) -> Iterator[Jobs]:
    yield from module_jobs(control_plane, admin_api, tmp_path_factory.mktemp("operator"),
                           {"metricsPort": free_port()})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_of(kubelet: Kubelet, jobs: Jobs, pod: str) -> dict[str, str]:
    run = kubelet.started(pod, jobs.namespace)
    assert run is not None, f"{pod} never ran"
    return {e["name"]: e.get("value", "") for e in run.pod["spec"]["containers"][0]["env"]}


# --- scenarios ------------------------------------------------------------------------------


def test_happy_path_two_shards(jobs: Jobs, kubelet: Kubelet, s3_bucket, tmp_path) -> None:
    """Also: recorded worker pods are deleted, and the job after ttlSecondsAfterFinished."""
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    jobs.create("happy", job_spec(s3_bucket, uri, "happy/") | {"ttlSecondsAfterFinished": 8})
    job = jobs.wait_phase("happy", "Succeeded")
    status = job["status"]
    assert status["shardsReady"] == "2/2" and status["shardsDone"] == "0-1"
    assert status["progress"]["done"] == status["progress"]["total"] == 12
    # Worker pods go once the status records their shards; index and finalize stay (logs).
    wait_for(lambda: jobs.pod_names("happy") == ["happy-finalize-0", "happy-index-0"],
             timeout=60)
    for shard in (0, 1):
        run = kubelet.started(f"happy-{shard}-0", jobs.namespace)
        assert run is not None and run.proc.returncode == 0
        assert kubelet.started(f"happy-{shard}-1", jobs.namespace) is None  # never rerun
    assert_output(s3_bucket, "happy/", tmp_path / "in.fa", tmp_path)
    wait_for(lambda: jobs.gone("happy"), timeout=60)  # the TTL, then its pods by GC
    wait_for(lambda: jobs.pods("happy") == [], timeout=60)
    reasons = jobs.reasons("happy")
    assert {"Indexing", "Running", "Merging"} <= set(reasons) and reasons.count("Succeeded") == 1


def preempted_and_resumed(jobs: Jobs, kubelet: Kubelet, s3, tmp: Path, name: str,
                          stop: Callable[[str], None]) -> dict[str, Any]:
    """Stop attempt 0 mid-shard with ``stop(pod)``; the job must resume from what the
    worker checkpointed on SIGTERM. Returns the pod's conditions as the server kept them."""
    uri = upload_fasta(s3, tmp, 24)
    # Attempt 0 pauses 15 s before its third batch (under the worker's 20 s SIGTERM deadline).
    spec = job_spec(s3, uri, f"{name}/", shards=1,
                    failpoints="stall:batch=2,attempt=0,seconds=15", resources={"gpus": 2})
    jobs.create(name, spec)
    wait_for(lambda: progress(s3, f"{name}/", 0).get("done", 0) >= 6, timeout=180)
    first = f"{name}-0-0"
    stop(first)
    disrupted = wait_for(lambda: condition({"status": jobs.pod(first)["status"]},
                                           "DisruptionTarget"), timeout=60)
    jobs.wait_phase(name, "Succeeded")
    run = kubelet.started(first, jobs.namespace)
    assert run is not None and run.proc.returncode == 143  # checkpointed on SIGTERM
    saved = json.loads(run.termination.read_text())["committed"]
    assert saved >= 6
    resumed = kubelet.started(f"{name}-0-1", jobs.namespace)
    assert resumed is not None  # its pod is deleted once the shard is recorded
    assert resumed.pod["metadata"]["annotations"]["embedjob.io/start-done"] == str(saved)
    log = kubelet.log(f"{name}-0-1", jobs.namespace)
    assert '"event":"shard.resume"' in log and f'"committed":{saved}' in log
    assert "RetryPreempted" in jobs.reasons(name)
    assert_output(s3, f"{name}/", tmp / "in.fa", tmp)
    return dict(disrupted)


def test_eviction_api_resumes_from_committed_parts(jobs: Jobs, kubelet: Kubelet, s3_bucket,
                                                   tmp_path) -> None:
    """policy/v1 Eviction: the server itself marks the pod (DisruptionTarget) and deletes it
    gracefully; the kubelet sends SIGTERM and the worker checkpoints."""
    disrupted = preempted_and_resumed(jobs, kubelet, s3_bucket, tmp_path, "ev",
                                      lambda pod: kubelet.evict(pod, jobs.namespace))
    assert disrupted["status"] == "True" and disrupted["reason"] == "EvictionByEvictionAPI"
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{jobs.operator.settings['metricsPort']}/metrics",  # type: ignore[union-attr]
        timeout=10).read().decode()
    assert metric(text, "embedjob_preemption_gpu_seconds_lost_total") > 0
    assert metric(text, 'embedjob_retries_total{failure_type="preempted"}') >= 1


def metric(text: str, name: str) -> float:
    """One sample of the operator's /metrics (the operator is shared by the module)."""
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return float(values[0])


def test_disruption_condition_then_delete_is_a_preemption(jobs: Jobs, kubelet: Kubelet,
                                                          s3_bucket, tmp_path) -> None:
    """A controller's way (taint manager, node drain): DisruptionTarget via pods/status,
    then a graceful delete."""
    disrupted = preempted_and_resumed(
        jobs, kubelet, s3_bucket, tmp_path, "dt",
        lambda pod: kubelet.disrupt(pod, jobs.namespace, reason="DeletionByTaintManager"))
    assert disrupted["reason"] == "DeletionByTaintManager"


def test_oom_kill_retries_with_a_smaller_token_budget(jobs: Jobs, kubelet: Kubelet, s3_bucket,
                                                      tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 8)
    spec = job_spec(s3_bucket, uri, "oom/", shards=1,
                    failpoints="stall:batch=0,attempt=0,seconds=60")
    jobs.create("oom", spec)
    wait_for(lambda: kubelet.started("oom-0-0", jobs.namespace), timeout=180)
    kubelet.oom_kill("oom-0-0", jobs.namespace)  # reported as state.terminated OOMKilled/137
    jobs.wait_phase("oom", "Succeeded")
    assert "EMBEDJOB_MAX_TOKENS_PER_BATCH" not in env_of(kubelet, jobs, "oom-0-0")
    assert env_of(kubelet, jobs, "oom-0-1")["EMBEDJOB_MAX_TOKENS_PER_BATCH"] == "1024"
    assert "RetryHostOom" in jobs.reasons("oom")
    assert_output(s3_bucket, "oom/", tmp_path / "in.fa", tmp_path)


def test_cuda_error_twice_fails_shard_and_job(jobs: Jobs, kubelet: Kubelet, s3_bucket,
                                              tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 8)
    # The same batch crashes both attempts; without quarantine that fails the shard.
    spec = job_spec(s3_bucket, uri, "cuda/", shards=1, failpoints="cuda_error:batch=0",
                    retry={"quarantine": False})
    jobs.create("cuda", spec)
    job = jobs.wait_phase("cuda", "Failed")
    status = job["status"]
    assert status["shardsFailed"] == "0"
    entry = status["manifest"][0]
    assert entry["state"] == "Failed" and entry["lastFailure"]["type"] == "cuda_error"
    assert entry["failures"] == {"cuda_error": 1, "poison_input": 1}
    failed = condition(job, "Failed")
    assert failed["status"] == "True" and "crash the model" in failed["message"]
    assert "retry.quarantine" in failed["message"] and "\n" not in failed["message"]
    events = {e["reason"]: e["message"] for e in jobs.events("cuda")}
    assert "RetryCudaError" in events and "crash the model" in events["ShardFailed"]
    # The retry is kept off the failing node, and the scheduler (test kubelet) obeys.
    retry = jobs.pod("cuda-0-1")
    first = kubelet.started("cuda-0-0", jobs.namespace)
    assert first is not None
    first_node = first.pod["spec"]["nodeName"]
    assert '"NotIn"' in json.dumps(retry["spec"]["affinity"]) and first_node in json.dumps(
        retry["spec"]["affinity"])
    assert retry["spec"]["nodeName"] != first_node
    assert "cuda-finalize-0" not in jobs.pod_names("cuda")


def test_bad_input_fails_fast_with_one_line(jobs: Jobs, s3_bucket, tmp_path) -> None:
    path = tmp_path / "dup.fa"
    path.write_text(">a\nMKTAYIAK\n>b\nMKVLAAGI\n>a\nMSTNPKPQ\n")
    s3_bucket.client.upload_file(str(path), s3_bucket.bucket, "dup.fa")
    jobs.create("dup", job_spec(s3_bucket, s3_bucket.uri("dup.fa"), "dup/"))
    job = jobs.wait_phase("dup", "Failed")
    failed = condition(job, "Failed")
    assert "duplicate" in failed["message"].lower() and "\n" not in failed["message"]
    assert "Traceback" not in failed["message"]
    assert jobs.pod_names("dup") == ["dup-index-0"]  # no retry of an input error


def test_poison_input_is_bisected_then_quarantined(jobs: Jobs, s3_bucket, tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 8)
    wanted = fasta_ids(tmp_path / "in.fa")
    bad = wanted[0]
    jobs.create("poi", job_spec(s3_bucket, uri, "poi/", shards=1,
                                failpoints=f"cuda_error:id={bad}"))
    job = jobs.wait_phase("poi", "Succeeded", timeout=240)
    manifest = json.loads(open_store(s3_bucket.uri("poi/"), s3_bucket.storage).read_bytes(
        layout.MANIFEST))
    assert manifest["quarantined"] == [bad]
    with embedjob.open(s3_bucket.uri("poi/"), s3_bucket.storage,
                       cache_dir=str(tmp_path / "cache-poi")) as out:
        assert sorted(out.ids) == sorted(set(wanted) - {bad})
    texts = " ".join(e["message"] for e in jobs.events("poi"))
    assert "one by one" in texts and f"sequence {bad} crashes the model; quarantined" in texts
    assert job["status"]["shardsDone"] == "0"


def test_operator_killed_mid_job_duplicates_nothing(jobs: Jobs, kubelet: Kubelet, s3_bucket,
                                                     tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    spec = job_spec(s3_bucket, uri, "rs/", failpoints="stall:batch=1,attempt=0,seconds=3")
    jobs.create("rs", spec)
    wait_for(lambda: {"rs-0-0", "rs-1-0"} <= set(jobs.pod_names("rs")), timeout=180)
    assert jobs.operator is not None
    jobs.operator.stop(signal.SIGKILL)
    jobs.operator.start()
    jobs.wait_phase("rs", "Succeeded")
    wait_for(lambda: jobs.pod_names("rs") == ["rs-finalize-0", "rs-index-0"], timeout=60)
    assert [kubelet.started(f"rs-{s}-1", jobs.namespace) for s in (0, 1)] == [None, None]
    assert_output(s3_bucket, "rs/", tmp_path / "in.fa", tmp_path)


def test_suspend_and_resume(jobs: Jobs, kubelet: Kubelet, s3_bucket, tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 24)
    # Attempt 0 sleeps 2 s before every batch: slow enough to be caught mid-shard.
    spec = job_spec(s3_bucket, uri, "sus/", shards=2, failpoints="stall:attempt=0,seconds=2")
    jobs.create("sus", spec)
    wait_for(lambda: all(progress(s3_bucket, "sus/", s).get("done", 0) > 0 for s in (0, 1)),
             timeout=180)
    jobs.patch_spec("sus", {"suspend": True})
    job = jobs.wait_phase("sus", "Suspended")
    # Deleted gracefully: gone once they have checkpointed (the index pod stays, Succeeded).
    wait_for(lambda: jobs.pod_names("sus") == ["sus-index-0"], timeout=120)
    codes = [kubelet.started(f"sus-{s}-0", jobs.namespace) for s in (0, 1)]
    assert [r.proc.returncode for r in codes if r is not None] == [143, 143]
    assert condition(job, "Suspended")["status"] == "True"
    saved = {s: progress(s3_bucket, "sus/", s)["done"] for s in (0, 1)}
    jobs.patch_spec("sus", {"suspend": False})
    jobs.wait_phase("sus", "Succeeded")
    for s in (0, 1):
        run = kubelet.started(f"sus-{s}-1", jobs.namespace)
        assert run is not None and run.pod["metadata"]["annotations"].get(
            "embedjob.io/start-done") == str(saved[s])
    assert_output(s3_bucket, "sus/", tmp_path / "in.fa", tmp_path)


def test_two_jobs_side_by_side(jobs: Jobs, kubelet: Kubelet, s3_bucket, tmp_path) -> None:
    """Also: fewer sequences than spec.shards -> the index's effective shard count."""
    uri = upload_fasta(s3_bucket, tmp_path, 6)
    few = upload_fasta(s3_bucket, tmp_path, 2, key="few.fa")
    jobs.create("left", job_spec(s3_bucket, uri, "left/", shards=1))
    jobs.create("right", job_spec(s3_bucket, few, "right/", shards=4))
    assert jobs.wait_phase("left", "Succeeded")["status"]["shardsReady"] == "1/1"
    assert jobs.wait_phase("right", "Succeeded")["status"]["shardsReady"] == "2/2"
    assert_output(s3_bucket, "left/", tmp_path / "in.fa", tmp_path)
    assert_output(s3_bucket, "right/", tmp_path / "few.fa", tmp_path)
    started = [p for p in ("left-0-0", "right-0-0", "right-1-0", "right-2-0")
               if kubelet.started(p, jobs.namespace)]
    assert started == ["left-0-0", "right-0-0", "right-1-0"]


def test_lost_node_mid_shard_is_replaced_and_output_is_exact(jobs: Jobs, kubelet: Kubelet,
                                                             s3_bucket, tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 24)
    spec = job_spec(s3_bucket, uri, "ln/", shards=1,
                    failpoints="stall:batch=2,attempt=0,seconds=120")
    jobs.create("ln", spec)
    wait_for(lambda: progress(s3_bucket, "ln/", 0).get("done", 0) >= 6, timeout=180)
    saved = progress(s3_bucket, "ln/", 0)["done"]
    node = jobs.pod("ln-0-0")["spec"]["nodeName"]
    try:
        assert kubelet.lose_node(node) == [f"{jobs.namespace}/ln-0-0"]
        job = jobs.wait_phase("ln", "Succeeded")
    finally:
        kubelet.register(node)  # a replacement machine under the same name
    resumed = kubelet.started("ln-0-1", jobs.namespace)
    assert resumed is not None
    assert int(resumed.pod["metadata"]["annotations"]["embedjob.io/start-done"]) >= saved
    assert '"event":"shard.resume"' in kubelet.log("ln-0-1", jobs.namespace)
    preempted = [e["message"] for e in jobs.events("ln") if e["reason"] == "RetryPreempted"]
    assert any("shard 0" in m and "disappeared" in m for m in preempted)
    assert job["status"]["shardsDone"] == "0"
    assert_output(s3_bucket, "ln/", tmp_path / "in.fa", tmp_path)
