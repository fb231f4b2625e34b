"""Worker pod manifests, table-driven."""

from __future__ import annotations

import json

import pytest
from operator_helpers import job

from embedjob.failures import ConfigError
from embedjob.operator.config import parse_settings
from embedjob.operator.pods import build_pod, pod_name
from embedjob.operator.views import pod_view
from embedjob.policy import ShardHistory

FRESH = ShardHistory()
SETTINGS = parse_settings({
    "workerImage": "img:1",
    "workerDefaults": {
        "tolerations": [{"key": "spot", "operator": "Exists"}],
        "nodeSelector": {"pool": "gpu"},
        "storage": {"endpointUrl": "http://minio:9000", "credentialsSecret": "s3-creds"},
        "env": [{"name": "FOO", "value": "1"}, {"name": "EMBEDJOB_SHARD", "value": "99"}],
    },
})


def pod(history: ShardHistory = FRESH, **spec) -> dict:
    return build_pod(job(**spec), "worker", 2, 1, history, SETTINGS)


def env_of(manifest: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in
            manifest["spec"]["containers"][0]["env"]}


CASES = [
    ("name", lambda p: p["metadata"]["name"] == "j-2-1"),
    ("labels", lambda p: p["metadata"]["labels"]["embedjob.io/shard"] == "2"
     and p["metadata"]["labels"]["embedjob.io/attempt"] == "1"
     and p["metadata"]["labels"]["embedjob.io/job"] == "j"),
    ("owner", lambda p: p["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
     and p["metadata"]["ownerReferences"][0]["controller"] is True),
    ("restart never", lambda p: p["spec"]["restartPolicy"] == "Never"),
    ("grace default 90", lambda p: p["spec"]["terminationGracePeriodSeconds"] == 90),
    ("image", lambda p: p["spec"]["containers"][0]["image"] == "img:1"),
    ("command", lambda p: p["spec"]["containers"][0]["command"] == ["embedjob"]
     and p["spec"]["containers"][0]["args"] == ["worker"]),
    ("gpu limit", lambda p: p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
     == "1"),
    ("termination message", lambda p: p["spec"]["containers"][0]["terminationMessagePolicy"]
     == "FallbackToLogsOnError"),
    ("restricted", lambda p: p["spec"]["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}),
    ("no API token in worker pods", lambda p: p["spec"]["automountServiceAccountToken"] is False),
    ("works in /cache", lambda p: p["spec"]["containers"][0]["workingDir"] == "/cache"),
    ("tmp writable", lambda p: {"name": "tmp", "mountPath": "/tmp"}
     in p["spec"]["containers"][0]["volumeMounts"]),
    ("defaults tolerations", lambda p: p["spec"]["tolerations"][0]["key"] == "spot"),
    ("defaults nodeSelector", lambda p: p["spec"]["nodeSelector"] == {"pool": "gpu"}),
    ("contract env", lambda p: env_of(p)["EMBEDJOB_SHARD"] == "2"
     and env_of(p)["EMBEDJOB_ATTEMPT"] == "1" and env_of(p)["EMBEDJOB_JOB"] == "j"
     and env_of(p)["FOO"] == "1"),
    ("spec carries storage defaults", lambda p: json.loads(env_of(p)["EMBEDJOB_SPEC"])
     ["storage"]["endpointUrl"] == "http://minio:9000"),
    ("secret only by reference", lambda p: env_of(p)["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID", "optional": False}}),
    ("no overrides by default", lambda p: "EMBEDJOB_PRECISION" not in env_of(p)),
]


@pytest.mark.parametrize("check", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_worker_pod(check) -> None:
    assert check(pod())


def test_history_becomes_env_and_anti_affinity() -> None:
    h = ShardHistory(max_tokens=512, precision="fp32", avoid_nodes=("bad-1",),
                     quarantined=("s9",), isolate=("s1", "s2"))
    p = pod(h, template={"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}}})
    env = env_of(p)
    assert env["EMBEDJOB_MAX_TOKENS_PER_BATCH"] == "512"
    assert env["EMBEDJOB_PRECISION"] == "fp32"
    assert json.loads(env["EMBEDJOB_QUARANTINE"]) == ["s9"]
    assert json.loads(env["EMBEDJOB_ISOLATE"]) == ["s1", "s2"]
    terms = p["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][-1] == {
        "key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["bad-1"]}
    assert terms[0]["matchExpressions"][0]["key"] == "gpu"
    assert ShardHistory.from_json(p["metadata"]["annotations"]["embedjob.io/history"]) == h


def test_template_merged_and_wins() -> None:
    p = pod(template={"nodeSelector": {"pool": "other"}, "serviceAccountName": "irsa",
                      "priorityClassName": "batch", "volumes": [{"name": "w", "emptyDir": {}}],
                      "env": [{"name": "BAR", "value": "2"}]})
    assert p["spec"]["nodeSelector"] == {"pool": "other"}
    assert p["spec"]["serviceAccountName"] == "irsa"
    assert p["spec"]["priorityClassName"] == "batch"
    assert {"name": "w", "emptyDir": {}} in p["spec"]["volumes"]
    assert env_of(p)["BAR"] == "2"


def test_unknown_template_key_refused() -> None:
    with pytest.raises(ConfigError, match="containers"):
        pod(template={"containers": []})


def test_index_pod_has_no_gpu_and_round_trips() -> None:
    p = build_pod(job(), "index", -1, 0, ShardHistory(), SETTINGS)
    assert p["metadata"]["name"] == pod_name("j", "index", -1, 0) == "j-index-0"
    assert "nvidia.com/gpu" not in p["spec"]["containers"][0]["resources"]["limits"]
    view = pod_view(p)
    assert view is not None and view.role == "index" and view.attempt == 0
