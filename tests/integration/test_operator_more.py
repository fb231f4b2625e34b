"""More cluster events for the real operator, with REAL workers, on the emulated cluster.

A lost node, a stuck pod, an unschedulable pod and poison input: each ends with the job
Succeeded and every input id in the output exactly once (or left out, for poison input).
Helpers and the job spec come from test_operator_scenarios; see cluster.py for the kubelet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster, Kubelet
from test_operator_scenarios import (
    assert_output,
    job_spec,
    pod,
    pod_names,
    progress,
    reasons,
    upload_fasta,
    wait_phase,
)

import embedjob
from embedjob import layout
from embedjob.store import open_store

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cluster(tmp_path: Path, s3_bucket, request: pytest.FixtureRequest):
    """Emulator + kubelet + operator; parametrize it indirectly with operator settings."""
    c = Cluster(tmp_path).start()
    Kubelet(c).start()
    c.start_operator(getattr(request, "param", None) or {})
    yield c
    c.stop()


def condition(job: dict[str, Any], kind: str) -> dict[str, Any]:
    return {c["type"]: c for c in job.get("status", {}).get("conditions", [])}.get(kind, {})


def fasta_ids(path: Path) -> list[str]:
    return [line[1:].split()[0] for line in path.read_text().splitlines()
            if line.startswith(">")]


def test_lost_node_mid_shard_is_replaced_and_output_is_exact(
    cluster: Cluster, s3_bucket, tmp_path: Path
) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 24)
    # Shard 0 pauses after two batches: the node goes while it has committed something.
    spec = job_spec(s3_bucket, uri, "ln/", shards=2,
                    failpoints="stall:batch=2,attempt=0,shard=0,seconds=60")
    cluster.apply_job("ln", spec)
    cluster.wait_for(lambda: progress(s3_bucket, "ln/", 0).get("done", 0) >= 6, timeout=120)
    saved = progress(s3_bucket, "ln/", 0)["done"]
    assert cluster.kubelet is not None
    cluster.kubelet.lose_node()  # processes killed, pods deleted with the node
    job = wait_phase(cluster, "ln", "Succeeded")
    assert "ln-0-1" in pod_names(cluster)  # the replacement is a new attempt, not a reuse
    assert int(pod(cluster, "ln-0-1")["metadata"]["annotations"]["embedjob.io/start-done"]) \
        >= saved  # it resumed from the committed parts
    assert '"event":"shard.resume"' in cluster.kubelet.log("ln-0-1")
    preempted = [e["message"] for e in cluster.events() if e["reason"] == "RetryPreempted"]
    assert any("shard 0" in m and "disappeared" in m for m in preempted)
    assert job["status"]["shardsDone"] == "0-1"
    assert_output(s3_bucket, "ln/", tmp_path / "in.fa", tmp_path)


@pytest.mark.parametrize("cluster", [{"stuckAfterSeconds": 20}], indirect=True)
def test_stuck_pod_is_replaced(cluster: Cluster, s3_bucket, tmp_path: Path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 24)
    spec = job_spec(s3_bucket, uri, "st/", shards=1,
                    failpoints="stall:batch=2,attempt=0,seconds=600",
                    checkpoint={"everySeconds": 0.5})
    cluster.apply_job("st", spec)
    wait_phase(cluster, "st", "Succeeded", timeout=240)
    events = [e for e in cluster.events() if e["reason"] == "RetryStuck"]
    assert events and "no progress" in events[0]["message"]
    assert cluster.kubelet is not None
    assert "st-0-1" in cluster.kubelet.procs
    # The stuck pod is deleted: stopped (SIGTERM, then SIGKILL after the grace) and gone.
    cluster.wait_for(lambda: "st-0-0" not in pod_names(cluster), timeout=60)
    assert cluster.kubelet.procs["st-0-0"][0].poll() is not None
    assert_output(s3_bucket, "st/", tmp_path / "in.fa", tmp_path)


@pytest.mark.parametrize("cluster", [{"unschedulableAfterSeconds": 1}], indirect=True)
def test_unschedulable_pod_waits_then_runs(cluster: Cluster, s3_bucket, tmp_path) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    assert cluster.kubelet is not None
    cluster.kubelet.hold("un-0-0")
    cluster.apply_job("un", job_spec(s3_bucket, uri, "un/", shards=1))

    def unschedulable() -> dict[str, Any] | None:
        job = cluster.job("un")
        return job if condition(job, "Unschedulable").get("status") == "True" else None

    job = cluster.wait_for(unschedulable, timeout=120)
    assert "un-0-0" in condition(job, "Unschedulable")["message"]
    assert job["status"]["phase"] == "Running"
    waiting = [e["message"] for e in cluster.events() if e["reason"] == "Unschedulable"]
    assert waiting and "Insufficient nvidia.com/gpu" in waiting[0]
    cluster.kubelet.schedule("un-0-0")
    job = wait_phase(cluster, "un", "Succeeded")
    assert condition(job, "Unschedulable")["status"] == "False"
    assert pod_names(cluster) == ["un-0-0", "un-finalize-0", "un-index-0"]  # not replaced
    assert_output(s3_bucket, "un/", tmp_path / "in.fa", tmp_path)


def test_poison_input_is_bisected_then_quarantined(
    cluster: Cluster, s3_bucket, tmp_path: Path
) -> None:
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    wanted = fasta_ids(tmp_path / "in.fa")
    bad = wanted[0]
    cluster.apply_job("poi", job_spec(s3_bucket, uri, "poi/", shards=1,
                                      failpoints=f"cuda_error:id={bad}"))
    job = wait_phase(cluster, "poi", "Succeeded", timeout=240)
    manifest = json.loads(open_store(s3_bucket.uri("poi/"), s3_bucket.storage).read_bytes(
        layout.MANIFEST))
    assert manifest["quarantined"] == [bad]
    with embedjob.open(s3_bucket.uri("poi/"), s3_bucket.storage,
                       cache_dir=str(tmp_path / "cache-poi")) as out:
        ids = list(out.ids)
    assert sorted(ids) == sorted(set(wanted) - {bad})
    assert "RetryCudaError" in reasons(cluster)
    texts = " ".join(e["message"] for e in cluster.events())
    assert "one by one" in texts and f"sequence {bad} crashes the model; quarantined" in texts
    assert job["status"]["shardsDone"] == "0"
