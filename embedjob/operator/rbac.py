"""The exact Kubernetes permissions the operator needs, as data.

The Helm chart renders its Role (one per watched namespace) or ClusterRole (cluster-wide
mode) from :data:`REQUIRED_RULES`, and a test asserts that the rendered rules equal these.
Every call in :mod:`embedjob.operator.kube` and every call kopf makes in our configuration
(standalone, resource scanning off) is covered; nothing more. Secrets: ``get`` only, by
name, for the operator's own reads of a job's output with the job's credentials Secret
(:mod:`embedjob.operator.storage_access`); no list or watch, so the operator never sees a
Secret a job does not name. Worker pods get credentials as secretKeyRef (the kubelet).
"""

from __future__ import annotations

from typing import TypedDict


class PolicyRule(TypedDict):
    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


REQUIRED_RULES: list[PolicyRule] = [
    # kopf: the watch stream of jobs, finalizer and annotations (patch);
    # kube.delete_job: spec.ttlSecondsAfterFinished
    {"apiGroups": ["embedjob.io"], "resources": ["embeddingjobs"],
     "verbs": ["list", "watch", "patch", "delete"]},
    # kube.patch_status
    {"apiGroups": ["embedjob.io"], "resources": ["embeddingjobs/status"], "verbs": ["patch"]},
    # kube.create_pod: pods name the job as owner with blockOwnerDeletion, which the
    # OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift) allows only to
    # who may update the owner's finalizers; kopf's own finalizer is a patch of the job.
    {"apiGroups": ["embedjob.io"], "resources": ["embeddingjobs/finalizers"],
     "verbs": ["update"]},
    # informer.PodInformer (list+watch, labelSelector); kube.create_pod / kube.delete_pod
    {"apiGroups": [""], "resources": ["pods"],
     "verbs": ["list", "watch", "create", "delete"]},
    # kube.post_event and kopf's own events
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kube.read_secret_data: a job's spec.storage.credentialsSecret, in the job's namespace
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]
"""Rules for a namespaced Role, or for the ClusterRole in cluster-wide mode (the same)."""

CLUSTER_WIDE_EXTRA_RULES: list[PolicyRule] = []
"""Nothing extra: kopf's CRD and namespace scanning is switched off (settings.scanning),
so the CRD must exist before the operator starts (the chart installs it)."""
