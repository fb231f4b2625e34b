"""End to end on real pods: the worker image on a real kubelet (containerd, runc, cgroups),
the real operator as the chart's ServiceAccount, S3 through moto's server.

Every fault comes from the cluster itself: the Eviction API, a deletion with a short grace
period, a memory limit's OOM killer, the operator's own death, suspend. The worker's
failpoints (``EMBEDJOB_FAILPOINTS`` via spec.template.env) only slow attempt 0 down so that a
fault surely lands mid-shard, or grow its memory until the kernel steps in.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_cluster import ROOT, WORKER_IMAGE
from kubernetes import client
from operatorkit import Jobs, assert_output, job_spec, progress, upload_fasta, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def e2e_spec(s3, input_uri: str, prefix: str, *, shards: int = 1, failpoints: str = "",
             memory: str = "1536Mi") -> dict[str, Any]:
    """The real-API-server tier's job, sized for a small real node (no GPU)."""
    return job_spec(s3, input_uri, prefix, shards=shards, failpoints=failpoints,
                    resources={"gpus": 0, "cpu": "250m", "memory": memory})


def upload(s3, tmp: Path, count: int, key: str) -> tuple[str, Path]:
    return upload_fasta(s3, tmp, count, key), tmp / key


def reasons(jobs: Jobs, job: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for event in jobs.events(job):
        out.setdefault(event["reason"], []).append(event["message"])
    return out


def started_done(jobs: Jobs, pod: str) -> int:
    return int(jobs.recorded(pod)["metadata"]["annotations"].get("embedjob.io/start-done", 0))


def env_of(jobs: Jobs, pod: str) -> dict[str, str]:
    container = jobs.recorded(pod)["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --- scenarios ------------------------------------------------------------------------------


def test_two_shards_succeed_with_verified_output(jobs: Jobs, s3, tmp_path) -> None:
    uri, fasta = upload(s3, tmp_path, 16, "ok.fa")
    jobs.create("ok", e2e_spec(s3, uri, "ok/", shards=2))
    job = jobs.wait_phase("ok", "Succeeded", timeout=480)
    assert job["status"]["shardsReady"] == "2/2"
    assert_output(s3, "ok/", fasta, tmp_path)
    for name in ("ok-0-0", "ok-1-0"):  # deleted once recorded: as last seen
        pod = jobs.recorded(name)
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
        assert pod["spec"]["containers"][0]["image"] == WORKER_IMAGE


def test_worker_image_keeps_the_dockerfile_contract(jobs: Jobs, admin_api) -> None:
    """Non-root numeric user, entrypoint, environment and working directory as
    Dockerfile.worker declares them, under the restricted Pod Security level."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("realnode_image",
                                                  ROOT / "tools" / "realnode_image.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up by name
    spec.loader.exec_module(tool)
    contract = tool.parse_dockerfile(ROOT / "Dockerfile.worker")
    probe = ("import json, os; print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), "
             "'cwd': os.getcwd(), 'env': dict(os.environ), 'writable_root': "
             "os.access('/', os.W_OK)}))")
    core = client.CoreV1Api(admin_api)
    for name, command, args in (("probe", ["python", "-c", probe], None),
                                ("entry", None, ["--help"])):
        container: dict[str, Any] = {
            "name": "c", "image": WORKER_IMAGE,
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"},
                             {"name": "tmp", "mountPath": "/tmp"}]}
        if command:
            container["command"] = command
        if args:
            container["args"] = args
        core.create_namespaced_pod(jobs.namespace, {
            "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [container],
                     "volumes": [{"name": "cache", "emptyDir": {}},
                                 {"name": "tmp", "emptyDir": {}}]}})
    for name in ("probe", "entry"):
        wait_for(lambda n=name: core.read_namespaced_pod(n, jobs.namespace).status.phase
                 in ("Succeeded", "Failed"), timeout=180)
    seen = json.loads(core.read_namespaced_pod_log("probe", jobs.namespace).strip())
    uid, _, gid = contract.user.partition(":")
    assert (seen["uid"], seen["gid"]) == (int(uid), int(gid or uid))
    assert seen["cwd"] == contract.workdir
    assert not seen["writable_root"]
    assert {k: seen["env"].get(k) for k in contract.env} == contract.env
    assert core.read_namespaced_pod("entry", jobs.namespace).status.phase == "Succeeded"
    assert "usage: embedjob" in core.read_namespaced_pod_log("entry", jobs.namespace)


def test_eviction_mid_shard_resumes_from_the_last_part(jobs: Jobs, s3, tmp_path) -> None:
    uri, fasta = upload(s3, tmp_path, 24, "ev.fa")
    # Attempt 0 sleeps 3 s before each batch: the eviction lands mid-shard.
    jobs.create("ev", e2e_spec(s3, uri, "ev/", failpoints="stall:attempt=0,seconds=3"))
    wait_for(lambda: progress(s3, "ev/", 0).get("done", 0) >= 6, timeout=300)
    client.CoreV1Api(jobs.api).create_namespaced_pod_eviction("ev-0-0", jobs.namespace, {
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": "ev-0-0", "namespace": jobs.namespace}})
    wait_for(lambda: "ev-0-1" in jobs.ran("ev"), timeout=120)
    # The real kubelet sent SIGTERM; the worker saved its batch and left: the new attempt
    # starts from everything the old one had embedded.
    job = jobs.wait_phase("ev", "Succeeded", timeout=300)
    assert started_done(jobs, "ev-0-1") >= 6
    events = reasons(jobs, "ev")
    assert "RetryPreempted" in events, events
    assert "RetryHostOom" not in events
    assert job["status"]["shardsDone"] == "0"
    assert_output(s3, "ev/", fasta, tmp_path)


def test_deletion_shorter_than_the_save_is_a_stop_not_an_oom(jobs: Jobs, s3, tmp_path) -> None:
    uri, fasta = upload(s3, tmp_path, 12, "kill.fa")
    # Attempt 0 hangs before batch 2 for 5 minutes, deaf to SIGTERM: the kubelet must SIGKILL.
    jobs.create("kill", e2e_spec(s3, uri, "kill/",
                                 failpoints="stall:batch=2,attempt=0,seconds=300"))
    wait_for(lambda: progress(s3, "kill/", 0).get("done", 0) > 0, timeout=300)
    client.CoreV1Api(jobs.api).delete_namespaced_pod("kill-0-0", jobs.namespace,
                                                     grace_period_seconds=2)
    job = jobs.wait_phase("kill", "Succeeded", timeout=300)
    events = reasons(jobs, "kill")
    assert "RetryHostOom" not in events, events
    assert any("grace period" in m for m in events.get("RetryPreempted", [])), events
    # The token budget was not halved: a stop is not a memory problem.
    assert env_of(jobs, "kill-0-1").get("EMBEDJOB_MAX_TOKENS_PER_BATCH") in (None, "2048")
    assert job["status"]["shardsDone"] == "0"
    assert_output(s3, "kill/", fasta, tmp_path)


def test_memory_limit_oomkill_retries_with_a_smaller_batch(jobs: Jobs, s3, tmp_path) -> None:
    uri, fasta = upload(s3, tmp_path, 8, "oom.fa")
    jobs.create("oom", e2e_spec(s3, uri, "oom/", memory="1Gi",
                                failpoints="hog:batch=0,attempt=0"))
    jobs.wait_phase("oom", "Succeeded", timeout=300)
    events = reasons(jobs, "oom")
    assert "RetryHostOom" in events, events
    assert env_of(jobs, "oom-0-1")["EMBEDJOB_MAX_TOKENS_PER_BATCH"] == "1024"
    assert_output(s3, "oom/", fasta, tmp_path)


def test_operator_restarted_mid_job_duplicates_nothing(jobs: Jobs, s3, tmp_path) -> None:
    uri, fasta = upload(s3, tmp_path, 16, "rs.fa")
    jobs.create("rs", e2e_spec(s3, uri, "rs/", shards=2, failpoints="stall:attempt=0,seconds=2"))
    wait_for(lambda: {"rs-0-0", "rs-1-0"} <= set(jobs.pod_names("rs")), timeout=300)
    assert jobs.operator is not None
    jobs.operator.stop(signal.SIGKILL)
    jobs.operator.start()
    jobs.wait_phase("rs", "Succeeded", timeout=400)
    assert jobs.ran("rs") == ["rs-0-0", "rs-1-0", "rs-finalize-0", "rs-index-0"]
    assert_output(s3, "rs/", fasta, tmp_path)


def test_suspend_then_resume_on_real_pods(jobs: Jobs, s3, tmp_path) -> None:
    uri, fasta = upload(s3, tmp_path, 24, "sus.fa")
    jobs.create("sus", e2e_spec(s3, uri, "sus/", failpoints="stall:attempt=0,seconds=3"))
    wait_for(lambda: progress(s3, "sus/", 0).get("done", 0) >= 6, timeout=300)
    jobs.patch_spec("sus", {"suspend": True})
    jobs.wait_phase("sus", "Suspended", timeout=120)
    wait_for(lambda: "sus-0-0" not in jobs.pod_names("sus"), timeout=120)
    saved = progress(s3, "sus/", 0)["done"]
    jobs.patch_spec("sus", {"suspend": False})
    jobs.wait_phase("sus", "Succeeded", timeout=300)
    assert started_done(jobs, "sus-0-1") == saved >= 6
    assert_output(s3, "sus/", fasta, tmp_path)
