"""The real operator against the emulated cluster, pods completing without a model
(the kubelet's command override): lifecycle and retry plumbing, no worker involved."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cluster import Cluster, Kubelet, write_summary

pytestmark = pytest.mark.timeout(180)

SPEC = {"input": {"uri": "/nonexistent/in.fa"}, "output": {"uri": "/tmp/embedjob-smoke/"},
        "shards": 3, "parallelism": 2}


def exit_with(code: int):
    return lambda pod: [sys.executable, "-c", f"import sys; sys.exit({code})"]


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path).start()
    yield c
    c.stop()


def test_lifecycle_with_instant_pods(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_summary(out, shards=3, sequences=30)  # the index pod below runs no worker
    Kubelet(cluster, command=exit_with(0)).start()
    cluster.start_operator()
    cluster.apply_job("smoke", {**SPEC, "output": {"uri": f"{out}/"}})
    job = cluster.wait_for(
        lambda: (j := cluster.job("smoke")).get("status", {}).get("phase") == "Succeeded" and j,
        timeout=120)
    assert job["status"]["shardsDone"] == "0-2" and job["status"]["shardsReady"] == "3/3"
    names = {p["metadata"]["name"] for p in cluster.pods()}
    assert {"smoke-index-0", "smoke-0-0", "smoke-1-0", "smoke-2-0", "smoke-finalize-0"} <= names
    reasons = [e["reason"] for e in cluster.events()]
    assert "Succeeded" in reasons


def test_invalid_spec_fails_with_condition(cluster: Cluster) -> None:
    Kubelet(cluster, command=exit_with(0)).start()
    cluster.start_operator()
    cluster.apply_job("bad", {**SPEC, "shards": 0})
    job = cluster.wait_for(
        lambda: (j := cluster.job("bad")).get("status", {}).get("phase") == "Failed" and j)
    cond = {c["type"]: c for c in job["status"]["conditions"]}["Failed"]
    assert cond["reason"] == "InvalidSpec" and "shards" in cond["message"]
    assert cluster.pods() == []


def test_input_error_fails_fast(cluster: Cluster) -> None:
    Kubelet(cluster, command=exit_with(65)).start()
    cluster.start_operator()
    cluster.apply_job("badin", SPEC)
    job = cluster.wait_for(
        lambda: (j := cluster.job("badin")).get("status", {}).get("phase") == "Failed" and j)
    assert "index failed" in job["status"]["message"]
    assert [p["metadata"]["name"] for p in cluster.pods()] == ["badin-index-0"]
