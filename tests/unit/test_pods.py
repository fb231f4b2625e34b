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
    "security": {"allowedServiceAccounts": ["irsa"]},
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
    ("cache has a size limit", lambda p: {"name": "cache", "emptyDir": {"sizeLimit": "80Gi"}}
     in p["spec"]["volumes"]),
    ("requests ephemeral storage", lambda p: p["spec"]["containers"][0]["resources"]
     ["requests"]["ephemeral-storage"] == "10Gi"),
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


SPOT_GPU = parse_settings({
    "workerDefaults": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"},
                        {"key": "karpenter.sh/capacity-type", "value": "spot"}],
        "nodeSelector": {"karpenter.sh/capacity-type": "spot"},
        "affinity": {"nodeAffinity": {"x": 1}}, "priorityClassName": "gpu-batch",
        "serviceAccountName": "s3-reader",
        "resources": {"limits": {"nvidia.com/gpu": 1}},
    },
})


@pytest.mark.parametrize("role", ["index", "finalize"])
def test_steps_schedule_as_cpu_pods_on_demand(role: str) -> None:
    """examples/eks-spot: the index step used to buy a spot GPU node."""
    template = {"nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "t"}],
                "runtimeClassName": "nvidia", "imagePullSecrets": [{"name": "reg"}]}
    settings = SPOT_GPU.model_copy(update={"security": SPOT_GPU.security.model_copy(
        update={"allowed_runtime_classes": ["nvidia"]})})
    p = build_pod(job(template=template), role, -1, 0, FRESH, settings)["spec"]
    resources = p["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in json.dumps(resources)
    assert resources == (settings.index_resources if role == "index"
                         else settings.finalize_resources)
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName",
                "runtimeClassName"):
        assert key not in p, key
    assert p["serviceAccountName"] == "s3-reader"  # the storage identity stays
    assert p["imagePullSecrets"] == [{"name": "reg"}]


def test_step_scheduling_is_overridable() -> None:
    settings = parse_settings({
        "indexResources": {"requests": {"cpu": "3"}},
        "stepPods": {"nodeSelector": {"capacity": "on-demand"},
                     "tolerations": [{"key": "cpu-pool", "operator": "Exists"}],
                     "priorityClassName": "steps"},
    })
    p = build_pod(job(), "index", -1, 0, FRESH, settings)["spec"]
    assert p["containers"][0]["resources"] == {"requests": {"cpu": "3"}}
    refused = build_pod(job(), "index", -1, 1, ShardHistory(avoid_nodes=("n1",)), settings)
    terms = refused["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]}]
    assert p["nodeSelector"] == {"capacity": "on-demand"}
    assert p["tolerations"] == [{"key": "cpu-pool", "operator": "Exists"}]
    assert p["priorityClassName"] == "steps"


def test_cache_and_ephemeral_storage_are_configurable() -> None:
    settings = parse_settings({"workerDefaults": {"cacheSizeLimit": "200Gi",
                                                  "ephemeralStorage": None}})
    p = build_pod(job(), "worker", 0, 0, FRESH, settings)["spec"]
    assert {"name": "cache", "emptyDir": {"sizeLimit": "200Gi"}} in p["volumes"]
    assert "ephemeral-storage" not in p["containers"][0]["resources"]["requests"]
