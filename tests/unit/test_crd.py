"""The CRD: generated from spec.py, committed without drift, structural, and agreeing with
pydantic on what is valid and on every default."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from embedjob.crd import CRD_PATHS, REGENERATE, crd_manifest, crd_yaml, structural
from embedjob.failures import ConfigError
from embedjob.spec import dump_spec, parse_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def openapi_schema() -> dict[str, Any]:
    (version,) = crd_manifest()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    found = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        found += walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        found += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += walk(node["additionalProperties"], f"{path}{{}}")
    return found


# --- what the API server does before validation, emulated on plain data -------------------


def prune_nulls(value: Any) -> Any:
    """Fields are not nullable: the API server drops explicit nulls (they mean "unset")."""
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: missing fields get their default,
    then defaults apply inside the result (so `default: {}` fills nested defaults)."""
    if isinstance(value, dict) and "properties" in node:
        out = dict(value)
        for key, child in node["properties"].items():
            if key not in out and "default" in child:
                out[key] = copy.deepcopy(child["default"])
            if key in out:
                out[key] = apply_defaults(out[key], child)
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(v, node["items"]) for v in value]
    return value


def unknown_fields(value: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """What strict server-side field validation (kubectl's default) would reject."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in node:
        found = []
        for key, child in value.items():
            if key in node["properties"]:
                found += unknown_fields(child, node["properties"][key], f"{path}.{key}")
            elif "additionalProperties" not in node:
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [
            p for i, v in enumerate(value) for p in unknown_fields(v, node["items"], f"{path}[{i}]")
        ]
    return []


def server_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The object as the API server would store it, after validating it like the server."""
    schema = openapi_schema()
    obj = apply_defaults(prune_nulls(doc), schema)
    errors = [e.message for e in OAS30Validator(schema).iter_errors(obj)]
    assert not errors, errors
    assert not unknown_fields(obj, schema), unknown_fields(obj, schema)
    return obj


def example_jobs() -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        if "data" in path.relative_to(EXAMPLES).parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "EmbeddingJob":
                jobs.append((str(path.relative_to(ROOT)), doc))
    return jobs


# --- drift -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", CRD_PATHS)
def test_committed_crd_matches_the_models(rel: str) -> None:
    committed = (ROOT / rel).read_text() if (ROOT / rel).exists() else ""
    assert committed == crd_yaml(), (
        f"{rel} is out of date with embedjob/spec.py: run `{REGENERATE}` and commit the result"
    )


# --- shape ---------------------------------------------------------------------------------


def test_crd_identity() -> None:
    crd = crd_manifest()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "embeddingjobs.embedjob.io"
    assert (spec["group"], spec["scope"]) == ("embedjob.io", "Namespaced")
    assert spec["names"]["kind"] == "EmbeddingJob" and spec["names"]["shortNames"] == ["ej"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural() -> None:
    for path, node in walk(openapi_schema()):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "const"} & set(node), path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        untyped = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string")  # int-or-string: Kubernetes wants no type there
        assert "type" in node or untyped, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "default" in node:  # a default must itself be valid where it is used
            assert not list(OAS30Validator(node).iter_errors(node["default"])), path


def test_status_is_camel_case_and_keeps_kopf_state() -> None:
    status = openapi_schema()["properties"]["status"]["properties"]
    assert {"observedGeneration", "shardsDone", "progress", "manifest", "conditions"} <= set(status)
    assert "etaSeconds" in status["progress"]["properties"]
    assert status["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    assert all("default" not in node for _, node in walk(openapi_schema()["properties"]["status"]))


def test_printer_columns_point_at_schema_fields() -> None:
    (version,) = crd_manifest()["spec"]["versions"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Shards", "Progress", "ETA", "Age"]
    paths = {path for path, _ in walk(openapi_schema())}
    for name, json_path in columns.items():
        if json_path.startswith(".metadata."):
            continue
        assert json_path in paths, (
            f"printer column {name}: {json_path} is not in the status schema; add the field to "
            "embedjob.spec.EmbeddingJobStatus (shardsReady: 'done/total', written by the operator)"
        )


def test_input_output_model_are_immutable() -> None:
    spec = openapi_schema()["properties"]["spec"]["properties"]
    for field in ("input", "output", "model"):
        rules = spec[field]["x-kubernetes-validations"]
        immutable = [r for r in rules if r["rule"] == "self == oldSelf"]
        assert len(immutable) == 1 and f"spec.{field} is immutable" in immutable[0]["message"]
    assert "x-kubernetes-validations" not in spec["shards"]  # scaling is allowed
    assert spec["model"]["default"] == {}  # so the rule holds even when YAML omits model


def test_template_keeps_arbitrary_pod_fields() -> None:
    template = openapi_schema()["properties"]["spec"]["properties"]["template"]
    assert template["type"] == "object"
    assert template["x-kubernetes-preserve-unknown-fields"] is True


def test_structural_rejects_what_kubernetes_cannot_express() -> None:
    with pytest.raises(ValueError, match="several non-null"):
        structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})
    with pytest.raises(ValueError, match="without a type"):
        structural({"description": "anything"}, {})


# --- examples and pydantic agreement ---------------------------------------------------------


def test_there_are_example_jobs() -> None:
    names = {path for path, _ in example_jobs()}
    assert {
        "examples/embeddingjob.yaml",
        "examples/dnabert-s.yaml",
        "examples/eks-spot/job.yaml",
        "examples/minio/job.yaml",
    } <= names


@pytest.mark.parametrize(
    ("path", "doc"), example_jobs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_example_is_valid_for_the_crd_and_pydantic(path: str, doc: dict[str, Any]) -> None:
    stored = server_view(doc)
    job = parse_job(doc)
    # The API server's defaults are pydantic's defaults: the operator sees the same job.
    assert dump_spec(parse_job(stored).spec) == dump_spec(job.spec)
    assert prune_nulls(stored["spec"]) == dump_spec(job.spec)


def test_minimal_job_is_fully_defaulted_by_the_server() -> None:
    doc = {
        "apiVersion": "embedjob.io/v1alpha1",
        "kind": "EmbeddingJob",
        "metadata": {"name": "j"},
        "spec": {"input": {"uri": "in.fa"}, "output": {"uri": "out/"}},
    }
    assert server_view(doc)["spec"] == dump_spec(parse_job(doc).spec)


BAD_SPECS = [
    {"model": {"pooling": "max"}},
    {"model": {"precision": "int8"}},
    {"shards": 0},
    {"output": {"uri": "out/", "dtype": "bfloat16"}},
    {"checkpoint": {"everySeconds": 0}},
    {"model": {"maxTokensPerBatch": 8}},
    {"model": {"maxTokensPerBatch": "big"}},
]


@pytest.mark.parametrize("bad", BAD_SPECS, ids=lambda b: str(b))
def test_crd_and_pydantic_reject_the_same_mistakes(bad: dict[str, Any]) -> None:
    doc = {
        "apiVersion": "embedjob.io/v1alpha1",
        "kind": "EmbeddingJob",
        "metadata": {"name": "j"},
        "spec": {"input": {"uri": "in.fa"}, "output": {"uri": "out/"}, **bad},
    }
    schema = openapi_schema()
    obj = apply_defaults(doc, schema)
    assert list(OAS30Validator(schema).iter_errors(obj))
    with pytest.raises(ConfigError):
        parse_job(doc)


def test_unknown_field_is_caught_by_strict_field_validation() -> None:
    doc = {
        "spec": {
            "input": {"uri": "in.fa"},
            "output": {"uri": "out/"},
            "model": {"pooling": "mean", "poolling": "cls"},
        }
    }
    assert unknown_fields(doc, openapi_schema()) == [".spec.model.poolling"]
    doc["spec"]["template"] = {"nodeSelector": {"a": "b"}, "anything": 1}
    assert unknown_fields(doc, openapi_schema()) == [".spec.model.poolling"]
