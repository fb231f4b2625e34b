"""Builders of raw Kubernetes bodies for the operator's unit tests (no cluster)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

from embedjob.operator.views import JobView, PodView, job_view, pod_view

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def ts(seconds: float = 0) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_body(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> dict:
    base = {"input": {"uri": "s3://b/in.fa"}, "output": {"uri": "s3://b/out/"}, "shards": 3}
    base.update(spec)
    body = {
        "apiVersion": "embedjob.io/v1alpha1",
        "kind": "EmbeddingJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "uid-1", "generation": generation},
        "spec": base,
    }
    if status is not None:
        body["status"] = status
    return body


def job(status: dict[str, Any] | None = None, **spec: Any) -> JobView:
    return job_view(job_body(status, **spec))


def with_state(
    manifest: dict[str, Any],
    phase: str,
    *,
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
    pod_reason: str | None = None,
    pod_message: str | None = None,
    finished: float = 0,
    started: float = 0,
    conditions: list[dict[str, Any]] | None = None,
    node: str = "node-a",
    deleting: float | None = None,
) -> PodView:
    body = copy.deepcopy(manifest)
    body["metadata"]["creationTimestamp"] = ts(started)
    body["spec"]["nodeName"] = node
    status: dict[str, Any] = {"phase": phase, "startTime": ts(started)}
    if exit_code is not None or reason:
        term = {"exitCode": exit_code, "finishedAt": ts(finished)}
        if reason:
            term["reason"] = reason
        if message:
            term["message"] = message
        status["containerStatuses"] = [{"name": "worker", "state": {"terminated": term}}]
    if pod_reason:
        status["reason"] = pod_reason
    if pod_message:
        status["message"] = pod_message
    if conditions:
        status["conditions"] = conditions
    if deleting is not None:
        body["metadata"]["deletionTimestamp"] = ts(deleting)
    body["status"] = status
    view = pod_view(body)
    assert view is not None
    return view
