"""The operator's security settings on the real API server: a job asking for a hostPath
volume fails at once, loudly, and no pod is created (the operator runs as the chart's
ServiceAccount, which could create such a pod: the check is the operator's own)."""

from __future__ import annotations

from pathlib import Path

from envtest import ControlPlane
from kubernetes import client
from operatorkit import condition, wait_for, watching


def test_a_hostpath_volume_fails_the_job_naming_the_setting(
        control_plane: ControlPlane, admin_api: client.ApiClient, crd_installed: str,
        namespace: str, tmp_path: Path) -> None:
    with watching(control_plane, admin_api, namespace, tmp_path) as jobs:
        jobs.create("hostpath", {
            "input": {"uri": str(tmp_path / "in.fa")}, "output": {"uri": str(tmp_path / "out")},
            "template": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}],
                         "volumeMounts": [{"name": "root", "mountPath": "/host"}]}})
        job = jobs.wait_phase("hostpath", "Failed", timeout=120)
        failed = condition(job, "Failed")
        assert failed["status"] == "True" and failed["reason"] == "InvalidSpec", failed
        assert failed["message"].startswith("spec.template.volumes[0].hostPath"), failed
        assert "security.allowedVolumeTypes" in failed["message"], failed
        event = wait_for(lambda: [e for e in jobs.events("hostpath")
                                  if e["reason"] == "InvalidSpec"], timeout=30)[0]
        assert event["type"] == "Warning"
        assert "hostPath" in event["message"] and "allowedVolumeTypes" in event["message"]
        assert jobs.pods("hostpath") == []
