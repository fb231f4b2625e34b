"""The control plane itself: the fixture gives a server that enforces what real clusters do."""

from __future__ import annotations

from kubernetes import client


def test_server_is_ready_and_authorizes_with_rbac(control_plane, admin_api, namespace) -> None:
    core = client.CoreV1Api(admin_api)
    assert core.read_namespace(namespace).metadata.name == namespace
    # An anonymous/unknown identity gets nothing: RBAC is on.
    done = control_plane.kubectl("auth", "can-i", "create", "pods", "-n", namespace,
                                 "--as", "system:serviceaccount:x:nobody", check=False)
    assert done.stdout.strip() == "no"


def test_owner_reference_enforcement_is_on(control_plane, admin_api, namespace) -> None:
    """Setting blockOwnerDeletion needs `update` on the owner's finalizers, as on OpenShift."""
    rbac = client.RbacAuthorizationV1Api(admin_api)
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "maker"}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "maker"},
        "rules": [{"apiGroups": [""], "resources": ["pods", "configmaps"],
                   "verbs": ["create", "get"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "maker"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "maker"},
        "subjects": [{"kind": "ServiceAccount", "name": "maker", "namespace": namespace}]})
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    pod = f"""apiVersion: v1
kind: Pod
metadata:
  name: owned
  namespace: {namespace}
  ownerReferences:
  - {{apiVersion: v1, kind: ConfigMap, name: owner, uid: {owner.metadata.uid},
     blockOwnerDeletion: true}}
spec:
  automountServiceAccountToken: false
  containers: [{{name: c, image: busybox}}]
"""
    done = control_plane.kubectl(
        "create", "--dry-run=server", "--as", f"system:serviceaccount:{namespace}:maker",
        "-f", "-", input=pod, check=False)
    assert done.returncode != 0
    assert "blockOwnerDeletion" in done.stderr
