"""End to end on kind: an EmbeddingJob from examples/minio/job.yaml runs to Succeeded on the
real operator and worker images, survives the eviction of a worker, and every input id is
in the output exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_cluster import NAMESPACE, ROOT, WORKER_IMAGE, Cluster, wait_until

from embedjob.operator.pods import pod_name
from embedjob.operator.views import LABEL_JOB, ROLE_WORKER

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(5400)]

JOB = "proteins-minio"
INPUT_KEY = "inputs/proteins.fa"
STALLED_SHARD = 0


def fasta_ids(path: Path) -> list[str]:
    return [line[1:].split()[0] for line in path.read_text().splitlines() if line.startswith(">")]


def helper_pod(name: str, script: str, config_map: str, env: dict[str, str]) -> dict[str, Any]:
    """A one-shot pod on the worker image (it has boto3 and embedjob) with the MinIO keys."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": WORKER_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", script],
                    "envFrom": [{"secretRef": {"name": "minio-credentials"}}],
                    "env": [
                        {"name": "HOME", "value": "/tmp"},
                        *({"name": k, "value": v} for k, v in env.items()),
                    ],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/data"},
                        {"name": "cache", "mountPath": "/cache"},
                    ],
                }
            ],
            "volumes": [
                {"name": "data", "configMap": {"name": config_map}},
                {"name": "cache", "emptyDir": {}},
            ],
        },
    }


def run_helper(k: Cluster, name: str, script: str, config_map: str, **env: str) -> str:
    k.kubectl("delete", "pod", name, "-n", NAMESPACE, "--ignore-not-found")
    k.apply(helper_pod(name, script, config_map, env))
    k.wait("--for=jsonpath={.status.phase}=Succeeded", f"pod/{name}", timeout=600)
    return k.logs(name)


UPLOAD = """
import os, boto3
s3 = boto3.client("s3", endpoint_url="http://minio:9000", region_name="us-east-1")
s3.upload_file("/data/proteins.fa", "embeddings", os.environ["INPUT_KEY"])
print("uploaded")
"""


def e2e_job() -> dict[str, Any]:
    """examples/minio/job.yaml, sized for a kind node, with shard 0's first attempt stalled
    mid-way (a failpoint) so that the eviction surely hits a running worker."""
    job = yaml.safe_load((ROOT / "examples/minio/job.yaml").read_text())
    spec = job["spec"]
    spec["parallelism"] = 2
    spec["resources"] = {"gpus": 0, "cpu": "500m", "memory": "1536Mi"}
    spec["template"] = {
        "env": [
            {
                "name": "EMBEDJOB_FAILPOINTS",
                "value": f"stall:shard={STALLED_SHARD},attempt=0,batch=3,seconds=900",
            }
        ]
    }
    return job


def evict(k: Cluster, pod: str) -> None:
    """The Eviction API, as a node drain or a spot interruption handler uses it."""
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": NAMESPACE},
    }
    k.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}/eviction",
        "-f",
        "-",
        stdin=json.dumps(body),
    )


def phase(k: Cluster) -> str | None:
    job = k.get("embeddingjob", JOB)
    return (job or {}).get("status", {}).get("phase")


def test_job_survives_an_eviction_and_succeeds(installed: Cluster, tmp_path: Path) -> None:
    k = installed
    proteins = ROOT / "examples/data/proteins.fa"
    expected = fasta_ids(proteins)
    k.kubectl("delete", "embeddingjob", JOB, "-n", NAMESPACE, "--ignore-not-found", "--wait")
    k.kubectl("delete", "configmap", "e2e-input", "-n", NAMESPACE, "--ignore-not-found")
    k.kubectl(
        "create", "configmap", "e2e-input", "-n", NAMESPACE, f"--from-file=proteins.fa={proteins}"
    )
    assert "uploaded" in run_helper(k, "e2e-upload", UPLOAD, "e2e-input", INPUT_KEY=INPUT_KEY)

    k.apply(e2e_job())
    first = pod_name(JOB, ROLE_WORKER, STALLED_SHARD, 0)

    def stalled_and_running() -> bool:
        pod = k.get("pod", first)
        return bool(pod) and pod["status"].get("phase") == "Running"

    wait_until(stalled_and_running, 900, f"worker pod {first} to run")
    wait_until(
        lambda: (
            (k.get("embeddingjob", JOB) or {}).get("status", {}).get("progress", {}).get("done", 0)
            > 0
        ),
        600,
        "committed progress in the job status",
    )
    evict(k, first)

    wait_until(lambda: phase(k) in ("Succeeded", "Failed"), 1800, "the job to finish")
    job = k.get("embeddingjob", JOB)
    assert job is not None
    assert job["status"]["phase"] == "Succeeded", json.dumps(job["status"], indent=1)[:4000]

    # The evicted shard ran again under a new attempt.
    pods = json.loads(
        k.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"{LABEL_JOB}={JOB}", "-o", "json").stdout
    )["items"]
    names = {p["metadata"]["name"] for p in pods}
    events = k.kubectl(
        "get",
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        f"involvedObject.name={JOB}",
        "-o",
        "json",
    ).stdout
    retried = pod_name(JOB, ROLE_WORKER, STALLED_SHARD, 1) in names or "preempt" in events.lower()
    assert retried, f"no sign of a retry of shard {STALLED_SHARD}: pods {sorted(names)}"

    # Every input id exactly once (inspect --verify also checks checksums and repeats).
    k.kubectl("delete", "configmap", "e2e-expected", "-n", NAMESPACE, "--ignore-not-found")
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(expected))
    k.kubectl(
        "create", "configmap", "e2e-expected", "-n", NAMESPACE, f"--from-file=ids.json={ids_file}"
    )
    report = json.loads(
        run_helper(k, "e2e-check", CHECK, "e2e-expected", JOB=JOB).strip().splitlines()[-1]
    )
    assert report["problems"] == []
    assert report["missing"] == [] and report["extra"] == [] and report["repeated"] == 0
    assert report["count"] == len(expected)


CHECK = """
import io, json, os, subprocess, sys
import boto3, h5py
prefix = f"outputs/{os.environ['JOB']}/"
proc = subprocess.run(["embedjob", "inspect", f"s3://embeddings/{prefix}", "--verify", "--json",
                       "--endpoint-url", "http://minio:9000"], capture_output=True, text=True)
try:
    report = json.loads(proc.stdout)
except ValueError:
    print(json.dumps({"problems": ["inspect failed: " + proc.stderr[-2000:]]}))
    sys.exit(0)
s3 = boto3.client("s3", endpoint_url="http://minio:9000", region_name="us-east-1")
ids = []
for shard in report["manifest"]["shards"]:
    body = s3.get_object(Bucket="embeddings", Key=prefix + shard["file"])["Body"].read()
    with h5py.File(io.BytesIO(body), "r") as h5:
        ids += [i.decode() if isinstance(i, bytes) else str(i) for i in h5["ids"][:]]
expected = json.load(open("/data/ids.json"))
print(json.dumps({"problems": report.get("problems", []),
                  "count": len(ids), "repeated": len(ids) - len(set(ids)),
                  "missing": sorted(set(expected) - set(ids))[:20],
                  "extra": sorted(set(ids) - set(expected))[:20]}))
"""
