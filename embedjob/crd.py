"""The EmbeddingJob CustomResourceDefinition, generated from the pydantic models in spec.py.

Kubernetes wants a *structural* OpenAPI v3 schema: no ``$ref``, a ``type`` on every node,
plain ``X`` instead of ``anyOf [X, null]`` (nulls are pruned), boolean ``exclusiveMinimum``. The
conversion is one pure function over pydantic's JSON schema; ``python -m embedjob.crd``
rewrites the committed copies (``crds/`` and the chart's ``crds/``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from embedjob.failures import ConfigError
from embedjob.spec import (
    API_GROUP,
    API_VERSION,
    ESM2_MODELS,
    KIND,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    PLURAL,
    EmbeddingJobSpec,
    EmbeddingJobStatus,
)

SHORT_NAMES = ["ej"]
CATEGORIES = ["all", "embedjob"]
# Repository-relative paths of the committed CRD; the drift test compares both.
CRD_PATHS = ("crds/embeddingjob.yaml", "charts/embedjob/crds/embeddingjob.yaml")
REGENERATE = "python -m embedjob.crd"
HEADER = f"# Generated from embedjob/spec.py by `{REGENERATE}` (or `embedjob crd`): do not edit.\n"

# Printer columns read plain status fields: kubectl cannot compute "3/10" from two fields.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Shards",
        "type": "string",
        "jsonPath": ".status.shardsReady",
        "description": "Finished shards / all shards",
    },
    {
        "name": "Progress",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of sequences embedded",
    },
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# CEL rules (x-kubernetes-validations) by schema path under spec. Transition rules
# (oldSelf) only run on update: they make what defines the output immutable, because
# changing it mid-job would mix two jobs' embeddings under one prefix.
def _quantity_rule(field: str) -> dict[str, str]:
    """The server's own quantity parser, as spec.py's QUANTITY_PATTERN is pydantic's."""
    return {
        "rule": "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
        "message": f"{field} must be a positive Kubernetes quantity, e.g. 4, 500m, 16Gi or 2G",
    }


def _model_rules() -> list[dict[str, str]]:
    """spec.py's model-name and layer checks in CEL (guarded: see the windowOverlap rule)."""
    layers = ", ".join(f"'{name}': {name.split('_')[1][1:]}" for name in ESM2_MODELS)
    known = ", ".join(f"'{name}'" for name in (*ESM2_MODELS, "dnabert-s"))
    return [
        {
            "rule": f"!has(self.name) || self.name in [{known}] || self.name.contains('/') "
            "|| (has(self.weights) && !self.name.lowerAscii().startsWith('esm'))",
            "message": "spec.model.name is not a known model: use esm2_t6_8M_UR50D … "
            "esm2_t48_15B_UR50D, dnabert-s, or a Hugging Face id such as "
            "'facebook/esm2_t6_8M_UR50D'",
            "fieldPath": ".name",
        },
        {
            "rule": f"!has(self.name) || !has(self.layer) || !(self.name in {{{layers}}}) || "
            f"(self.layer <= {{{layers}}}[self.name] && "
            f"self.layer >= -{{{layers}}}[self.name] - 1)",
            "message": "spec.model.layer is out of range for this ESM-2 model: use 0..L or "
            "-1 .. -(L+1), L its number of layers (esm2_t33_… has 33)",
            "fieldPath": ".layer",
        },
    ]


SPEC_RULES: dict[tuple[str, ...], list[dict[str, str]]] = {
    ("input",): [
        {
            "rule": "self == oldSelf",
            "message": "spec.input is immutable: create a new EmbeddingJob for another input",
        },
        {
            "rule": "has(self.uri) != has(self.uris)",
            "message": "set exactly one of spec.input.uri or spec.input.uris",
        },
    ],
    ("output",): [
        {
            "rule": "self == oldSelf",
            "message": "spec.output is immutable: create a new EmbeddingJob for another output",
        }
    ],
    ("model",): [
        {
            "rule": "self == oldSelf",
            "message": "spec.model is immutable: create a new EmbeddingJob for another model",
        },
        {
            # The server checks `default: {}` against this rule before it fills the nested
            # defaults, so an unguarded rule fails on `{}` and the CRD is refused. Stored
            # objects always carry both fields (defaulting runs before validation).
            "rule": "!has(self.windowOverlap) || !has(self.maxResidues) "
            "|| self.windowOverlap < self.maxResidues",
            "message": "spec.model.windowOverlap must be smaller than spec.model.maxResidues",
            "fieldPath": ".windowOverlap",
        },
        *_model_rules(),
    ],
    ("resources", "cpu"): [_quantity_rule("spec.resources.cpu")],
    ("resources", "memory"): [_quantity_rule("spec.resources.memory")],
}

# Rules on the whole object: CEL sees metadata.name at the root only.
ROOT_RULES: list[dict[str, str]] = [
    {
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters: it goes into "
        "the pods' embedjob.io/job label",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must be a DNS label: lowercase letters, digits and '-'",
    },
]


class _DefaultFactories(GenerateJsonSchema):
    """Emit ``default: {}`` for sub-objects built by a default factory.

    The API server then fills in the nested defaults, so a stored job always carries the
    full model/checkpoint/retry settings, just as pydantic sees them, and the immutability
    rule on ``spec.model`` applies even when the YAML left ``model`` out.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        return {} if isinstance(factory(), BaseModel) else NoDefault  # type: ignore[call-arg]


_DROP = {"title", "$defs"}
# Readable key order in the generated YAML: what a node is before what it contains.
_ORDER = ("type", "description", "format", "enum", "default", "minimum")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {key: i for i, key in enumerate(_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _bound(node: dict[str, Any], key: str, bound: str) -> None:
    """JSON Schema's numeric exclusive bound -> OpenAPI 3.0's boolean form."""
    if isinstance(node.get(key), (int, float)) and not isinstance(node[key], bool):
        node[bound] = node.pop(key)
        node[key] = True


def structural(node: dict[str, Any], defs: dict[str, Any], keep_defaults: bool = True) -> dict:
    """Turn one pydantic JSON-schema node into a Kubernetes structural schema node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description/default win
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in node:
            node = _merge_alternatives(node, combinator, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and (value is None or not keep_defaults)):
            continue
        out |= _structural_key(key, value, defs, keep_defaults)
    _bound(out, "exclusiveMinimum", "minimum")
    _bound(out, "exclusiveMaximum", "maximum")
    untyped = ("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
    if "type" not in out and not any(out.get(key) for key in untyped):
        raise ValueError(f"schema node without a type cannot be structural: {node}")
    return _ordered(out)


def _structural_key(key: str, value: Any, defs: dict[str, Any],
                    keep_defaults: bool) -> dict[str, Any]:
    """One key of a schema node in its structural form (nothing: the key is dropped)."""
    if key == "const":
        return {"enum": [value]}
    if key == "properties":
        return {key: {k: structural(v, defs, keep_defaults) for k, v in value.items()}}
    if key == "items":
        return {key: structural(value, defs, keep_defaults)}
    if key == "additionalProperties":
        if isinstance(value, dict) and value:
            return {key: structural(value, defs, keep_defaults)}
        if value is True or value == {}:
            return {"x-kubernetes-preserve-unknown-fields": True}
        # additionalProperties: false is not allowed: the API server prunes unknown
        # fields instead, and strict field validation (kubectl's default) rejects them.
        return {}
    return {key: value}


def _merge_alternatives(node: dict[str, Any], key: str, defs: dict[str, Any]) -> dict:
    """``anyOf [X, null]`` -> X; a single ``allOf`` member is inlined.

    Optional fields are not marked ``nullable``: the API server then prunes an explicit
    null before defaulting, so ``field: null`` means "unset" exactly as in pydantic, and
    enums need no null member.
    """
    options = node.pop(key)
    real = [o for o in options if o.get("type") != "null"]
    if len(real) != 1:
        raise ValueError(f"{key} with several non-null alternatives is not structural: {options}")
    inner = real[0]
    if "$ref" in inner:
        inner = {
            **defs[inner["$ref"].rsplit("/", 1)[-1]],
            **{k: v for k, v in inner.items() if k != "$ref"},
        }
    return {**inner, **node}


def _add_rules(schema: dict[str, Any], rules: dict[tuple[str, ...], list[dict[str, str]]]) -> None:
    for path, path_rules in rules.items():
        node = schema
        for part in path:
            node = node["properties"][part]
        node["x-kubernetes-validations"] = path_rules


def spec_schema() -> dict[str, Any]:
    """The structural schema of ``.spec`` with defaults and CEL rules."""
    raw = EmbeddingJobSpec.model_json_schema(by_alias=True, schema_generator=_DefaultFactories)
    schema = structural(raw, raw.get("$defs", {}))
    _add_rules(schema, SPEC_RULES)
    # Pod template fragments follow the Pod API; the operator validates what it merges.
    schema["properties"]["template"]["x-kubernetes-preserve-unknown-fields"] = True
    return schema


def status_schema() -> dict[str, Any]:
    """The structural schema of ``.status``: no defaults (the operator writes all of it)."""
    raw = EmbeddingJobStatus.model_json_schema(by_alias=True)
    schema = structural(raw, raw.get("$defs", {}), keep_defaults=False)
    conditions = schema["properties"].get("conditions")
    if conditions is not None:  # Kubernetes conventions: one condition per type
        conditions["x-kubernetes-list-type"] = "map"
        conditions["x-kubernetes-list-map-keys"] = ["type"]
    # kopf keeps its own bookkeeping (handler progress) under status.kopf; without this
    # the API server would prune it and kopf would retry handlers forever.
    schema["properties"]["kopf"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return schema


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition for ``embedjob.io/v1alpha1`` EmbeddingJob."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {
                "app.kubernetes.io/name": "embedjob",
                "app.kubernetes.io/part-of": "embedjob",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A batch job that embeds FASTA sequences with a "
                            "protein or DNA language model, sharded over preemptible pods.",
                            "required": ["spec"],
                            "x-kubernetes-validations": ROOT_RULES,
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as the committed YAML text (stable key order, header comment)."""
    body = yaml.safe_dump(crd_manifest(), sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def write_crd(path: str | Path) -> None:
    """Write the CRD YAML to ``path`` (``-`` for stdout)."""
    text = crd_yaml()
    if str(path) == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as err:
        raise ConfigError(
            f"cannot write {target}: {err.strerror or err} — choose a writable -o path"
        ) from None


def main() -> None:
    """Rewrite every committed copy of the CRD (run from the repository root)."""
    root = Path(__file__).resolve().parent.parent
    for rel in CRD_PATHS:
        write_crd(root / rel)
        print(f"wrote {rel}")


if __name__ == "__main__":
    main()
