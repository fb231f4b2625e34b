"""Pod manifests for the index, worker and finalize steps. Pure: data in, dict out."""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

from embedjob.attempts import attempt_env, spec_text
from embedjob.failures import DEFAULT_TERMINATION_LOG, ConfigError
from embedjob.operator.config import OperatorSettings
from embedjob.operator.names import (
    ANN_HISTORY,
    ANN_LAST_FAILURE,
    ANN_START_DONE,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_JOB_UID,
    LABEL_ROLE,
    LABEL_SHARD,
    RESTART_ENV,
    ROLE_FINALIZE,
    ROLE_INDEX,
    ROLE_WORKER,
)
from embedjob.operator.views import JobView
from embedjob.policy import ShardHistory
from embedjob.spec import API_GROUP, API_VERSION, KIND, EmbeddingJobSpec
from embedjob.status import attempt_name

CONTAINER = "worker"
CACHE_DIR = "/cache"
TEMPLATE_KEYS = frozenset({
    "nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName",
    "env", "volumes", "volumeMounts", "imagePullSecrets", "runtimeClassName", "schedulerName",
    "labels", "annotations",
})
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
COMMANDS = {ROLE_INDEX: "index", ROLE_WORKER: "worker", ROLE_FINALIZE: "finalize"}


def pod_name(job: str, role: str, shard: int, attempt: int) -> str:
    """Deterministic, so creating twice conflicts instead of duplicating."""
    return attempt_name(job, role, shard, attempt)


def effective_spec(spec: EmbeddingJobSpec, settings: OperatorSettings) -> EmbeddingJobSpec:
    """The spec a worker receives: storage defaults from the operator filled in."""
    defaults = settings.worker_defaults.storage
    storage = spec.storage.model_copy(
        update={
            "endpoint_url": spec.storage.endpoint_url or defaults.endpoint_url,
            "region": spec.storage.region or defaults.region,
            "credentials_secret": spec.storage.credentials_secret or defaults.credentials_secret,
        }
    )
    return spec.model_copy(update={"storage": storage})


def build_pod(
    job: JobView,
    role: str,
    shard: int,
    attempt: int,
    history: ShardHistory,
    settings: OperatorSettings,
    *,
    start_done: int = 0,
    last_failure: str | None = None,
) -> dict[str, Any]:
    """The manifest of one attempt. Raises ConfigError for an unusable spec.template."""
    assert job.spec is not None
    spec, template, text = _prepared(job.spec, settings)
    defaults = settings.worker_defaults
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Workers never call the Kubernetes API: no token to steal from a compromised pod.
        # (IRSA still works: EKS's webhook projects its own token volume.)
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": defaults.termination_grace_period_seconds,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(job, spec, role, shard, attempt, history, settings, template,
                                  text)],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            # Bounded: a runaway cache is evicted as `disk` (its own budget), not as a
            # preemption retried a hundred times, and cannot fill the node's disk.
            {"name": "cache", "emptyDir": {"sizeLimit": defaults.cache_size_limit}},
            *copy.deepcopy(template.get("volumes") or []),
        ],
    }
    if role == ROLE_WORKER:
        _scheduling(pod_spec, defaults.model_dump(by_alias=True), template, role, history)
    else:
        _step_scheduling(pod_spec, settings, template, history)
    restart = job.status.requests.restart
    if role == ROLE_INDEX and restart:  # embedjob.io/restart: the index step discards first
        pod_spec["containers"][0]["env"].append({"name": RESTART_ENV, "value": restart})
    metadata = _metadata(job, role, shard, attempt, template)
    metadata["annotations"] |= _annotations(history, start_done, last_failure)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


_PREPARED: dict[tuple[int, int], tuple[Any, ...]] = {}
PREPARED_KEEP = 64


def _prepared(spec: EmbeddingJobSpec, settings: OperatorSettings
              ) -> tuple[EmbeddingJobSpec, dict[str, Any], str]:
    """The effective spec, the checked template and the spec's JSON, once per (spec,
    settings) object rather than once per pod (a 10^4-pod wave would build them 10^4 times).
    Keyed by identity (the objects are frozen; each entry keeps its key objects alive)."""
    key = (id(spec), id(settings))
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is spec and hit[1] is settings:
        return hit[2], hit[3], hit[4]
    eff = effective_spec(spec, settings)
    template = _checked_template(eff, settings)  # raises before anything is kept
    if len(_PREPARED) >= PREPARED_KEEP:
        _PREPARED.clear()  # specs of finished jobs and of earlier passes
    _PREPARED[key] = (spec, settings, eff, template, spec_text(eff))
    return eff, template, _PREPARED[key][4]


def _checked_template(spec: EmbeddingJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    """spec.template, refused with one line when it asks for what is not allowed."""
    template = dict(spec.template or {})
    unknown = sorted(set(template) - TEMPLATE_KEYS)
    if unknown:
        allowed = ", ".join(sorted(TEMPLATE_KEYS))
        raise ConfigError(f"spec.template: unsupported key {unknown[0]!r}; allowed: {allowed}")
    refusal = check_security(spec.image, template, settings)
    if refusal:
        raise ConfigError(refusal)
    return template


def _metadata(job: JobView, role: str, shard: int, attempt: int,
              template: dict[str, Any]) -> dict[str, Any]:
    labels = {
        **(template.get("labels") or {}),
        LABEL_JOB: job.name,
        LABEL_JOB_UID: job.uid,
        LABEL_ROLE: role,
        LABEL_SHARD: str(shard) if role == ROLE_WORKER else role,
        LABEL_ATTEMPT: str(attempt),
        "app.kubernetes.io/managed-by": "embedjob",
    }
    return {
        "name": pod_name(job.name, role, shard, attempt),
        "namespace": job.namespace,
        "labels": labels,
        "annotations": dict(template.get("annotations") or {}),
        "ownerReferences": [owner_reference(job)],
    }


def _annotations(history: ShardHistory, start_done: int,
                 last_failure: str | None) -> dict[str, str]:
    """What the attempt carries for the next reconcile: its history and where it began."""
    out = {ANN_HISTORY: history.to_json()}
    if start_done:
        out[ANN_START_DONE] = str(start_done)
    if last_failure:
        out[ANN_LAST_FAILURE] = last_failure
    return out


def owner_reference(job: JobView) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _container(
    job: JobView,
    spec: EmbeddingJobSpec,
    role: str,
    shard: int,
    attempt: int,
    history: ShardHistory,
    settings: OperatorSettings,
    template: dict[str, Any],
    spec_json: str | None = None,
) -> dict[str, Any]:
    return {
        "name": CONTAINER,
        "image": spec.image or settings.worker_image,
        "command": ["embedjob"],
        "args": [COMMANDS[role]],
        # The image's WORKDIR, set here too so that any image honouring the contract works.
        "workingDir": CACHE_DIR,
        "env": _env(job, spec, shard, attempt, history, settings, template, spec_json),
        "resources": _resources(spec, settings) if role == ROLE_WORKER else copy.deepcopy(
            settings.index_resources if role == ROLE_INDEX else settings.finalize_resources),
        "terminationMessagePath": DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": CACHE_DIR},
            *copy.deepcopy(template.get("volumeMounts") or []),
        ],
    }


def _env(
    job: JobView,
    spec: EmbeddingJobSpec,
    shard: int,
    attempt: int,
    history: ShardHistory,
    settings: OperatorSettings,
    template: dict[str, Any],
    spec_json: str | None = None,
) -> list[dict[str, Any]]:
    ours = {
        **attempt_env(spec, job.name, shard, attempt, history, DEFAULT_TERMINATION_LOG,
                      spec_json),
        "HOME": "/tmp",
        "XDG_CACHE_HOME": CACHE_DIR,
        "TORCH_HOME": f"{CACHE_DIR}/torch",
        "HF_HOME": f"{CACHE_DIR}/huggingface",
    }
    if spec.storage.region:
        ours["AWS_REGION"] = spec.storage.region
    user = [*settings.worker_defaults.env, *(template.get("env") or [])]
    # Ours win: a user's EMBEDJOB_SHARD would break the contract, not customise it.
    env = [copy.deepcopy(e) for e in user if e.get("name") not in ours]
    env += [{"name": k, "value": v} for k, v in ours.items()]
    secret = spec.storage.credentials_secret
    if secret:
        env = [e for e in env if e.get("name") not in AWS_KEYS]
        env += [
            {
                "name": key,
                "valueFrom": {
                    "secretKeyRef": {"name": secret, "key": key, "optional": key == AWS_KEYS[2]}
                },
            }
            for key in AWS_KEYS
        ]
    return env


def _resources(spec: EmbeddingJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    """A worker's: spec.resources over the operator's workerDefaults.resources."""
    defaults = settings.worker_defaults
    base = copy.deepcopy(defaults.resources or {})
    requests = {**base.get("requests", {}), "cpu": spec.resources.cpu,
                "memory": spec.resources.memory}
    if defaults.ephemeral_storage:
        requests.setdefault("ephemeral-storage", defaults.ephemeral_storage)
    limits = {**base.get("limits", {}), "memory": spec.resources.memory}
    if spec.resources.gpus:
        limits["nvidia.com/gpu"] = str(spec.resources.gpus)
    return {"requests": requests, "limits": limits}


def _scheduling(
    pod_spec: dict[str, Any],
    defaults: dict[str, Any],
    template: dict[str, Any],
    role: str,
    history: ShardHistory,
) -> None:
    """Template wins over operator defaults; avoided nodes are added as anti-affinity."""
    for key in ("nodeSelector", "priorityClassName", "serviceAccountName", "affinity",
                "runtimeClassName", "schedulerName", "imagePullSecrets"):
        value = template.get(key, defaults.get(key))
        if value:
            pod_spec[key] = copy.deepcopy(value)
    tolerations = [*defaults.get("tolerations", []), *(template.get("tolerations") or [])]
    if tolerations:
        pod_spec["tolerations"] = copy.deepcopy(tolerations)
    if role == ROLE_WORKER and history.avoid_nodes:
        pod_spec["affinity"] = avoid_nodes(pod_spec.get("affinity") or {}, history.avoid_nodes)


STEP_TEMPLATE_KEYS = ("serviceAccountName", "imagePullSecrets")
"""What index/finalize pods take from a job's template: its storage identity and registry
access; never its GPU/spot scheduling (they run on CPU, by default on on-demand capacity)."""


def _step_scheduling(
    pod_spec: dict[str, Any], settings: OperatorSettings, template: dict[str, Any],
    history: ShardHistory,
) -> None:
    """Index/finalize pods: the operator's stepPods settings, not the workers'; nodes that
    refused an earlier attempt (admission, disk) are avoided as for workers."""
    steps = settings.step_pods
    worker = settings.worker_defaults
    values = {
        "nodeSelector": steps.node_selector,
        "tolerations": steps.tolerations,
        "affinity": steps.affinity,
        "priorityClassName": steps.priority_class_name,
        "serviceAccountName": template.get("serviceAccountName", worker.service_account_name),
        "imagePullSecrets": template.get("imagePullSecrets"),
    }
    for key, value in values.items():
        if value:
            pod_spec[key] = copy.deepcopy(value)
    if history.avoid_nodes:
        pod_spec["affinity"] = avoid_nodes(pod_spec.get("affinity") or {}, history.avoid_nodes)


def check_security(
    image: str | None, template: dict[str, Any], settings: OperatorSettings
) -> str | None:
    """The first thing a job asks for that the operator's ``security`` settings do not allow,
    as one line naming the field and the setting that would allow it; None: allowed."""
    sec = settings.security
    if image and image != settings.worker_image and not any(
        fnmatch.fnmatchcase(image, pattern) for pattern in sec.allowed_images
    ):
        return _refused("spec.image", repr(image), "security.allowedImages")
    account = template.get("serviceAccountName")
    # Naming the identity a pod gets anyway grants nothing: the workers' configured one, or
    # the namespace's "default" when none is configured.
    own = settings.worker_defaults.service_account_name or "default"
    if account and account != own and account not in sec.allowed_service_accounts:
        return _refused("spec.template.serviceAccountName", repr(account),
                        "security.allowedServiceAccounts")
    for key, allowed, setting in (
        ("runtimeClassName", sec.allowed_runtime_classes, "allowedRuntimeClasses"),
        ("schedulerName", sec.allowed_scheduler_names, "allowedSchedulerNames"),
    ):
        value = template.get(key)
        if value and value not in allowed:
            return _refused(f"spec.template.{key}", repr(value), f"security.{setting}")
    for i, volume in enumerate(template.get("volumes") or []):
        # A volume without a source is defaulted to emptyDir by the API server.
        bad = sorted(k for k in volume if k != "name" and k not in sec.allowed_volume_types)
        if bad:
            return _refused(f"spec.template.volumes[{i}].{bad[0]}",
                            f"volume {volume.get('name', '?')!r}", "security.allowedVolumeTypes")
    return None


def _refused(field: str, what: str, setting: str) -> str:
    return (f"{field}: {what} is not allowed by the operator's settings (an administrator "
            f"can allow it in {setting})")


def avoid_nodes(affinity: dict[str, Any], nodes: tuple[str, ...]) -> dict[str, Any]:
    """Add `hostname NotIn nodes` to every required node-selector term (terms are ORed)."""
    expr = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": list(nodes)}
    result = copy.deepcopy(affinity)
    required = result.setdefault("nodeAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {}
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({"matchExpressions": []})
    for term in terms:
        term.setdefault("matchExpressions", []).append(copy.deepcopy(expr))
    return result
