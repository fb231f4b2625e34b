"""Operator settings: one YAML/JSON file (the Helm chart renders it into a ConfigMap).

Loaded from ``$EMBEDJOB_OPERATOR_CONFIG`` when set, else built-in defaults. Keys are
camelCase; unknown keys are refused so that a typo in the chart's values never passes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from embedjob.failures import ConfigError

CONFIG_ENV = "EMBEDJOB_OPERATOR_CONFIG"
DEFAULT_WORKER_IMAGE = "ghcr.io/embedjob/embedjob-worker:0.1.0"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class WorkerStorage(_Model):
    """S3 defaults for jobs whose spec.storage leaves them unset."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO…)")
    region: str | None = Field(None, description="AWS region")
    credentials_secret: str | None = Field(
        None, description="Secret (in the job's namespace) with AWS_ACCESS_KEY_ID/…SECRET…"
    )


class WorkerDefaults(_Model):
    """Pod settings applied to every worker pod; a job's spec.template overrides them."""

    resources: dict[str, Any] | None = Field(
        None, description="Pod resources (requests/limits) replacing the ones from spec.resources"
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    service_account_name: str | None = None
    termination_grace_period_seconds: int = Field(90, ge=0)
    env: list[dict[str, Any]] = Field(default_factory=list)
    storage: WorkerStorage = Field(default_factory=WorkerStorage)
    cache_size_limit: str = Field(
        "80Gi", description="sizeLimit of every pod's /cache emptyDir (model weights, caches)"
    )
    ephemeral_storage: str | None = Field(
        "10Gi", description="ephemeral-storage request of worker pods (none: no request)"
    )


DEFAULT_INDEX_RESOURCES = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
DEFAULT_FINALIZE_RESOURCES = DEFAULT_INDEX_RESOURCES
"""Both steps stream: one core, and memory for the index's per-sequence table or the merge's
buffers. Raise them for inputs of hundreds of millions of sequences."""


class StepPods(_Model):
    """Scheduling of the index and finalize pods: CPU work, so none of the workers' GPU or
    spot settings apply; empty by default (any node without taints: on-demand capacity)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None


class Security(_Model):
    """What a job's spec.image and spec.template may ask for (see pods.check_security)."""

    allowed_images: list[str] = Field(
        default_factory=list,
        description="Glob patterns of images spec.image may name; the workerImage always",
    )
    allowed_service_accounts: list[str] = Field(
        default_factory=list,
        description="ServiceAccounts spec.template may name besides the workers' default one",
    )
    allowed_volume_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_VOLUME_TYPES),
        description="Volume sources spec.template.volumes may use",
    )
    allowed_runtime_classes: list[str] = Field(
        default_factory=list, description="RuntimeClasses spec.template may name"
    )
    allowed_scheduler_names: list[str] = Field(
        default_factory=list, description="Schedulers spec.template may name"
    )
    operator_storage_identity: Literal["jobSecretOnly", "allowOperatorIdentity"] = Field(
        "jobSecretOnly",
        description="Whose identity reads a job's output when the job names no credentials "
        "Secret (IRSA): nobody's (jobSecretOnly), or the operator's own",
    )


DEFAULT_VOLUME_TYPES = ("emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected",
                        "downwardAPI", "ephemeral")
"""Volume sources that reach only what the namespace already grants (its own ConfigMaps,
Secrets, claims): no hostPath, and no inline network or CSI volume that names storage the
namespace's users may not reach through a claim."""


class WaitDeadlines(_Model):
    """Seconds a job may wait on something that waiting rarely fixes, then it fails
    (0: wait forever). Counted from facts in the pods and the status, so a restart of the
    operator does not reset them."""

    image_pull: float = Field(600.0, ge=0, description="ErrImagePull / ImagePullBackOff")
    config_error: float = Field(
        300.0, ge=0, description="CreateContainerConfigError / CreateContainerError (a missing "
        "Secret or ConfigMap key)")
    unschedulable: float = Field(
        0.0, ge=0, description="PodScheduled=False/Unschedulable (0: spot capacity comes back)")
    index_unreadable: float = Field(
        600.0, ge=0, description="index/summary.json unreadable after the index step finished")


class OperatorSettings(_Model):
    worker_image: str = Field(DEFAULT_WORKER_IMAGE, description="Default worker image")
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty: cluster-wide"
    )
    metrics_port: int = Field(8080, ge=0, le=65535, description="Prometheus /metrics (0: off)")
    liveness_port: int = Field(8081, ge=0, le=65535, description="/healthz (0: off)")
    status_interval_seconds: float = Field(
        5.0, gt=0, description="Shortest interval between two status patches of one job"
    )
    progress_poll_seconds: float = Field(
        30.0, gt=0,
        description="Shortest interval between two listings of a job's heartbeats"
    )
    stuck_after_seconds: float = Field(
        1800.0, gt=0,
        description="Floor of the heartbeat threshold: a running worker whose heartbeat has not "
        "moved for this long (or 5 x its slowest pass, if longer) is replaced",
    )
    storage_requests_per_minute: float = Field(
        6000.0, gt=0,
        description="Operator-wide budget of storage requests for progress and liveness: "
        "listings of each job's heartbeats (at most half of it), then a GET of each heartbeat "
        "that changed",
    )
    unschedulable_after_seconds: float = Field(
        300.0, gt=0, description="Pending+Unschedulable this long: condition and Event"
    )
    wait_deadlines: WaitDeadlines = Field(default_factory=WaitDeadlines)
    wait_event_interval_seconds: float = Field(
        300.0, gt=0, description="At most one Warning Event per job and wait cause this often"
    )
    create_chunk: int = Field(
        1000, ge=1, description="Most pods one reconcile pass of a job creates; the status is "
        "written and replacements go first before the next chunk"
    )
    worker_defaults: WorkerDefaults = Field(default_factory=WorkerDefaults)
    index_resources: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_INDEX_RESOURCES),
        description="Resources of index pods (CPU only; spec.resources is for workers)",
    )
    finalize_resources: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_FINALIZE_RESOURCES),
        description="Resources of finalize pods (CPU only)",
    )
    step_pods: StepPods = Field(default_factory=StepPods)
    security: Security = Field(default_factory=Security)


def load_settings(path: str | Path | None = None) -> OperatorSettings:
    """Settings from ``path`` (or $EMBEDJOB_OPERATOR_CONFIG); defaults when neither is set."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return OperatorSettings()
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read operator config {path}: {err.strerror}") from None
    return parse_settings(_parse_text(text, str(path)))


def parse_settings(data: Any) -> OperatorSettings:
    try:
        return OperatorSettings.model_validate(data or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; keys are camelCase)"
        raise ConfigError(f"invalid operator config: {where}: {msg}") from None


def _parse_text(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {str(err).splitlines()[0]}") from None
