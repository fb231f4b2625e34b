"""The operator's own storage reads on a REAL API server: liveness from the heartbeat, and
the job's identity for every read. Real workers, moto's S3 behind tests/faultproxy.py (which
records the access key id that signed each request)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import unquote

import pytest
from kubelet import Kubelet
from kubernetes import client
from operatorkit import Jobs, job_spec, module_jobs, upload_fasta

pytestmark = pytest.mark.timeout(300)

STUCK_AFTER = 20


@pytest.fixture(scope="module")
def jobs(control_plane, admin_api, crd_installed, kubelet, tmp_path_factory) -> Iterator[Jobs]:
    yield from module_jobs(control_plane, admin_api, tmp_path_factory.mktemp("operator"),
                           {"stuckAfterSeconds": STUCK_AFTER})


def test_slow_but_beating_worker_stays_and_a_silent_one_is_replaced(
        jobs: Jobs, kubelet: Kubelet, s3_bucket, tmp_path) -> None:
    """Shard 0 spends ~7 s on each forward pass and commits only at the end (~45 s without
    a commit, past stuckAfterSeconds): its heartbeat moves, so it stays. Shard 1 hangs in
    its second pass: its heartbeat stops, and a fresh read sees it stopped: replaced."""
    uri = upload_fasta(s3_bucket, tmp_path, 12)
    slow = ";".join(f"stall:pass={p},shard=0,attempt=0,seconds=7" for p in range(6))
    env = [{"name": "EMBEDJOB_FAILPOINTS",
            "value": f"{slow};stall:pass=1,shard=1,attempt=0,seconds=600"},
           {"name": "EMBEDJOB_HEARTBEAT_SECONDS", "value": "2"}]
    spec = job_spec(s3_bucket, uri, "lv/", shards=2, template={"env": env},
                    model={"maxTokensPerBatch": 64},  # one sequence a batch: 6 passes a shard
                    checkpoint={"everySequences": 100, "everySeconds": 600})
    jobs.create("lv", spec)
    jobs.wait_phase("lv", "Succeeded", timeout=240)
    stuck = [e for e in jobs.events("lv") if e["reason"] == "RetryStuck"]
    assert len(stuck) == 1 and "shard 1" in stuck[0]["message"], stuck
    assert "no heartbeat" in stuck[0]["message"]
    pods = jobs.ran("lv")  # worker pods are deleted once recorded
    assert "lv-1-1" in pods and "lv-0-1" not in pods
    slow_run = kubelet.started("lv-0-0", jobs.namespace)
    assert slow_run is not None and slow_run.proc.returncode == 0
    log = kubelet.log("lv-0-0", jobs.namespace)
    assert log.count('"event":"checkpoint.committed"') == 1  # one commit, at the very end


JOB_KEY, JOB_SECRET = "AKIAJOBSCOPED0000001", "job-secret-value-never-logged"
AMBIENT_KEY = "AKIAAMBIENT000000001"


def test_operator_reads_with_the_jobs_secret_and_never_its_own_identity(
        jobs: Jobs, s3_proxied, tmp_path) -> None:
    """Every request the proxy sees while two jobs run is signed by a job's identity: the
    job with a credentials Secret is read with that Secret's key; the job without one (an
    ambient identity, as IRSA) is not read at all under the default jobSecretOnly — it still
    runs, and says so once. The operator's own key (its environment's) signs nothing."""
    s3 = s3_proxied
    core = client.CoreV1Api(jobs.api)
    core.create_namespaced_secret(jobs.namespace, {
        "metadata": {"name": "job-s3"},
        "stringData": {"AWS_ACCESS_KEY_ID": JOB_KEY, "AWS_SECRET_ACCESS_KEY": JOB_SECRET}})
    uri = upload_fasta(s3, tmp_path, 12)
    start = len(s3.proxy.signed)
    scoped = job_spec(s3, uri, "scoped/", storage={"credentialsSecret": "job-s3"})
    ambient = job_spec(s3, uri, "ambient/", template={"env": [
        {"name": "AWS_ACCESS_KEY_ID", "value": AMBIENT_KEY},
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "ambient"}]})
    del ambient["storage"]["credentialsSecret"]
    jobs.create("scoped", scoped)
    jobs.create("ambient", ambient)
    done = {name: jobs.wait_phase(name, "Succeeded", timeout=240)
            for name in ("scoped", "ambient")}
    signed = s3.proxy.signed[start:]
    assert {key for key, _, _ in signed} <= {JOB_KEY, AMBIENT_KEY}, signed
    heartbeats = [(key, path) for key, method, path in signed  # listings and GETs
                  if method == "GET" and "heartbeats" in unquote(path)]
    assert heartbeats and all(key == JOB_KEY and "scoped/heartbeats/" in unquote(path)
                              for key, path in heartbeats)  # only the operator reads them
    refused = [e for e in jobs.events("ambient") if e["reason"] == "StorageNotRead"]
    assert len(refused) == 1 and "operatorStorageIdentity" in refused[0]["message"]
    assert done["scoped"]["status"]["progress"]["done"] == 12
    # Credentials stay out of everything the operator writes.
    assert jobs.operator is not None
    written = [jobs.operator.log_tail(10**7), json.dumps(jobs.events("scoped")),
               json.dumps(jobs.events("ambient")), json.dumps(done)]
    for text in written:
        assert JOB_SECRET not in text and JOB_KEY not in text
