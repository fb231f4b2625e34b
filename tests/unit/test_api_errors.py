"""API errors as the operator reports them: the server's own message, in bytes that fit."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from kubernetes.client.exceptions import ApiException

from embedjob.operator.kube import describe, fit_bytes, permanent
from embedjob.operator.reconcile import refused
from embedjob.operator.views import job_view


def api_error(status: int, reason: str, message: str) -> ApiException:
    err = ApiException(status=status, reason=reason)
    err.body = json.dumps({"kind": "Status", "status": "Failure", "message": message,
                           "reason": "Invalid", "code": status})
    return err


def test_describe_gives_the_status_code_and_the_servers_message() -> None:
    err = api_error(422, "Unprocessable Entity", 'Pod "j-0-0" is invalid: spec.nodeSelector')
    assert describe(err) == '422 Unprocessable Entity: Pod "j-0-0" is invalid: spec.nodeSelector'
    assert describe(ApiException(status=500, reason="Internal Server Error")) == (
        "500 Internal Server Error")


def test_fit_bytes_cuts_on_a_character_boundary() -> None:
    assert fit_bytes("short", 1024) == "short"
    cut = fit_bytes("é" * 600, 1024)  # 1200 bytes, 600 characters
    assert len(cut.encode()) <= 1024 and cut.endswith("...") and cut.startswith("é")
    assert fit_bytes("a" * 1024, 1024) == "a" * 1024


def test_which_refusals_are_permanent() -> None:
    assert permanent(api_error(422, "Unprocessable Entity", "invalid"))
    assert permanent(api_error(400, "Bad Request", "bad"))
    assert permanent(api_error(403, "Forbidden", "cannot set blockOwnerDeletion"))
    assert not permanent(api_error(403, "Forbidden", 'exceeded quota: q, requested: pods=1'))
    assert not permanent(api_error(403, "Forbidden",
                                   "error looking up service account ns/default"))
    assert not permanent(api_error(409, "Conflict", "exists"))
    assert not permanent(api_error(500, "Internal Server Error", "etcd"))


def test_refused_fails_the_job_and_stops_its_pods() -> None:
    body = {"metadata": {"name": "j", "namespace": "n", "uid": "u", "generation": 2},
            "spec": {"input": {"uri": "in.fa"}, "output": {"uri": "out/"}}}
    job = job_view(body)
    plan = refused(job, [], "the API server refused pod j-index-0: 422 ...: bad", datetime.now(
        timezone.utc))
    assert plan.status is not None and plan.status["phase"] == "Failed"
    (failed,) = [c for c in plan.status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "PodRejected" and "422" in failed["message"]
    assert [e.reason for e in plan.events] == ["PodRejected"] and plan.status_urgent
