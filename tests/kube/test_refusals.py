"""Nothing fails silently: a pod the API server refuses for good fails the job, loudly.

The spec passes the CRD (spec.template is free-form) but not pod validation: the operator,
as the chart's ServiceAccount, gets 422 on the pod create. No kubelet is needed.
"""

from __future__ import annotations

import time
from pathlib import Path

from envtest import ControlPlane
from kubernetes import client
from operatorkit import condition, wait_for, watching

from embedjob.operator.kube import EVENT_MESSAGE_BYTES

# Keys with a space are not label keys; many of them, non-ASCII, make the server's message
# longer than an Event may carry in bytes (though not in characters). Labels, because every
# pod takes them (index pods take no nodeSelector from the template: they run on CPU nodes).
BAD_LABELS = {f"zoné {'é' * 20} {i}": "x" for i in range(20)}


def test_a_pod_the_server_refuses_fails_the_job_with_its_message(
        control_plane: ControlPlane, admin_api: client.ApiClient, crd_installed: str,
        namespace: str, tmp_path: Path) -> None:
    with watching(control_plane, admin_api, namespace, tmp_path) as jobs:
        jobs.create("refused", {"input": {"uri": str(tmp_path / "in.fa")},
                                "output": {"uri": str(tmp_path / "out")},
                                "template": {"labels": BAD_LABELS}})
        job = jobs.wait_phase("refused", "Failed", timeout=120)
        failed = condition(job, "Failed")
        assert failed["status"] == "True" and failed["reason"] == "PodRejected", failed
        assert "422" in failed["message"] and "metadata.labels" in failed["message"], failed
        event = wait_for(lambda: [e for e in jobs.events("refused")
                                  if e["reason"] == "PodRejected"], timeout=30)[0]
        assert event["type"] == "Warning"
        assert "metadata.labels" in event["message"] and "zoné" in event["message"]
        assert len(event["message"].encode()) <= EVENT_MESSAGE_BYTES  # cut, and posted
        time.sleep(3)  # longer than the operator's retry interval for API errors
        log = jobs.operator.log_tail(200_000)
        assert log.count("pod_refused") == 1, log[-3000:]  # one refusal, no retry loop
        assert "api_error" not in log, log[-3000:]
        assert "422 Unprocessable Entity" in log and "metadata.labels" in log, log[-3000:]
        assert jobs.pods("refused") == []
