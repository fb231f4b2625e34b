"""The test kubelet's pure rules: node fit, mount mapping, downward API (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubelet import REFERENCE, _map_path, field_value, fits, node_labels

AVOID_ONE = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
    "nodeSelectorTerms": [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-1"]}]}]}}}}


def test_required_affinity_and_selector_decide_the_node() -> None:
    assert fits({}, node_labels("node-1"))
    assert not fits(AVOID_ONE, node_labels("node-1"))
    assert fits(AVOID_ONE, node_labels("node-2"))
    assert not fits({"nodeSelector": {"pool": "gpu"}}, node_labels("node-2"))


def test_container_paths_map_to_the_pods_folders(tmp_path: Path) -> None:
    paths = {"/tmp": tmp_path / "tmp", "/cache": tmp_path / "cache",
             "/dev/termination-log": tmp_path / "term"}
    assert _map_path("/cache/torch", paths) == str(tmp_path / "cache" / "torch")
    assert _map_path("/dev/termination-log", paths) == str(tmp_path / "term")
    assert _map_path("/cachedir", paths) == "/cachedir"  # a prefix of a name is not a mount
    assert _map_path("s3://b/cache", paths) == "s3://b/cache"


def test_downward_api_fields() -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns", "labels": {"a": "1"}},
           "spec": {"nodeName": "node-1"}}
    assert field_value(pod, "metadata.name") == "p"
    assert field_value(pod, "spec.nodeName") == "node-1"
    assert field_value(pod, "metadata.labels['a']") == "1"
    with pytest.raises(LookupError, match="unsupported fieldRef"):
        field_value(pod, "status.phase")


@pytest.mark.parametrize(("image", "valid"), [
    ("ghcr.io/embedjob/embedjob-worker:0.1.0", True), ("busybox", True),
    ("unreachable.invalid/embedjob:1", True), ("localhost:5000/a/b@sha256:" + "a" * 64, True),
    ("Bad Image", False), ("UPPER/x", False), ("x:", False), ("ghcr.io/A:1", False)])
def test_image_names_a_kubelet_cannot_parse(image: str, valid: bool) -> None:
    assert bool(REFERENCE.match(image)) is valid
