"""The EmbeddingJob resource as a real API server sees it: the CRD, examples, refusals, columns.

The unit tests (tests/unit/test_crd.py) emulate the server's defaulting and schema checks on
plain data; here the server itself decides, CEL rules and quantity parsing included.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from envtest import ControlPlane
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from operatorkit import REPO

from embedjob.crd import CRD_PATHS
from embedjob.failures import ConfigError
from embedjob.spec import MAX_NAME_LENGTH, parse_job

EXAMPLES = REPO / "examples"
# Documents whose API this bare control plane does not serve (Karpenter's CRDs).
FOREIGN_GROUPS = ("karpenter.sh/", "karpenter.k8s.aws/")


def job_doc(name: str = "j", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob", "metadata": {"name": name},
        "spec": {"input": {"uri": "in.fa"}, "output": {"uri": "out/"}, **spec},
    }


DRY = "default"  # dry runs store nothing: one namespace serves them all


@dataclass
class Answer:
    returncode: int
    stderr: str  # the server's message when refused


@pytest.fixture(scope="module")
def dynamic(admin_api: client.ApiClient, crd_installed: str) -> DynamicClient:
    return DynamicClient(admin_api)


def create(api: DynamicClient, namespace: str, doc: dict[str, Any], *,
           dry_run: bool = True) -> Answer:
    """Create through the API (strict field validation, as kubectl does); a refusal is data."""
    resource = api.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    query = [("fieldValidation", "Strict")] + ([("dryRun", "All")] if dry_run else [])
    raw = api.client  # the dynamic client has no fieldValidation parameter: call the path
    request = raw.param_serialize("POST", resource.path(namespace=namespace), query_params=query,
                                  header_params={"Content-Type": "application/json"}, body=doc,
                                  auth_settings=["BearerToken"])
    try:
        response = raw.call_api(*request)
        response.read()
        raw.response_deserialize(response, {"201": "object", "200": "object"})
    except ApiException as err:
        return Answer(1, json.loads(err.body).get("message", err.body))
    return Answer(0, "")


@pytest.mark.parametrize("rel", CRD_PATHS)
def test_server_accepts_the_crd(control_plane: ControlPlane, rel: str) -> None:
    """Both committed copies pass the server's own checks (defaults against CEL rules...)."""
    done = control_plane.kubectl("apply", "--server-side", "--force-conflicts",
                                 "-f", str(REPO / rel), check=False)
    assert done.returncode == 0, f"the server refuses {rel}: {done.stderr.strip()}"
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          "crd/embeddingjobs.embedjob.io")


def example_docs() -> list[tuple[str, int, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and "kind" in doc:  # values.yaml files are Helm values
                found.append((str(path.relative_to(REPO)), i, doc))
    return found


@pytest.mark.parametrize(("rel", "index", "doc"), example_docs(),
                         ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_example_passes_a_server_side_dry_run(control_plane, dynamic, rel: str,
                                              index: int, doc: dict) -> None:
    if doc["apiVersion"].startswith(FOREIGN_GROUPS):
        pytest.skip(f"{doc['kind']} needs Karpenter's CRDs, not installed on this control plane")
    done = create(dynamic, DRY, doc)
    assert done.returncode == 0, f"{rel} #{index}: {done.stderr.strip()}"


# (spec fields or a whole-document change, text the server's refusal must contain)
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("two sources", {"input": {"uri": "a.fa", "uris": ["b.fa"]}}, "spec.input"),
    ("no source", {"input": {"alphabet": "protein"}}, "spec.input"),
    ("pooling", {"model": {"pooling": "max"}}, "spec.model.pooling"),
    ("precision", {"model": {"precision": "int8"}}, "spec.model.precision"),
    ("overlap", {"model": {"windowOverlap": 1022}}, "spec.model.windowOverlap"),
    ("model name", {"model": {"name": "esm2_t6_8M"}}, "spec.model.name"),
    ("layer", {"model": {"layer": 7}}, "spec.model.layer"),
    ("negative layer", {"model": {"name": "esm2_t12_35M_UR50D", "layer": -14}},
     "spec.model.layer"),
    ("token budget", {"model": {"maxTokensPerBatch": 8}}, "spec.model.maxTokensPerBatch"),
    ("residues", {"model": {"maxResidues": 4}}, "spec.model.maxResidues"),
    ("dtype", {"output": {"uri": "out/", "dtype": "bfloat16"}}, "spec.output.dtype"),
    ("no shards", {"shards": 0}, "spec.shards"),
    ("too many shards", {"shards": 100001}, "spec.shards"),
    ("parallelism", {"parallelism": 0}, "spec.parallelism"),
    ("checkpoint", {"checkpoint": {"everySeconds": 0}}, "spec.checkpoint.everySeconds"),
    ("retry", {"retry": {"gpuOom": -1}}, "spec.retry.gpuOom"),
    ("memory GB", {"resources": {"memory": "2GB"}}, "spec.resources.memory"),
    ("memory zero", {"resources": {"memory": "0"}}, "spec.resources.memory"),
    ("cpu negative", {"resources": {"cpu": "-1"}}, "spec.resources.cpu"),
    ("cpu word", {"resources": {"cpu": "four"}}, "spec.resources.cpu"),
    ("gpus", {"resources": {"gpus": -1}}, "spec.resources.gpus"),
    ("typo", {"model": {"poolling": "cls"}}, "spec.model.poolling"),
]


@pytest.mark.parametrize(("case", "spec", "field"), BAD, ids=[b[0] for b in BAD])
def test_server_and_pydantic_refuse_an_invalid_spec(control_plane, dynamic, case: str,
                                                    spec: dict, field: str) -> None:
    doc = job_doc(**spec)
    done = create(dynamic, DRY, doc)
    assert done.returncode != 0, f"the server accepted an invalid spec ({case})"
    assert field in done.stderr, done.stderr
    with pytest.raises(ConfigError):
        parse_job(doc)


@pytest.mark.parametrize(("name", "ok"), [
    ("a" * MAX_NAME_LENGTH, True), ("a" * (MAX_NAME_LENGTH + 1), False), ("a.b", False),
])
def test_job_names_fit_a_label(control_plane, dynamic, name: str, ok: bool) -> None:
    """A name goes into the pods' embedjob.io/job label (63 characters at most, no dots)."""
    done = create(dynamic, DRY, job_doc(name))
    assert (done.returncode == 0) is ok, done.stderr
    if not ok:
        assert "metadata.name" in done.stderr
        with pytest.raises(ConfigError, match=r"metadata\.name"):
            parse_job(job_doc(name))


def test_longest_name_makes_valid_pods(control_plane, dynamic, namespace) -> None:
    """Pods of a job with the longest allowed name pass the server's pod validation."""
    from embedjob.operator.config import OperatorSettings
    from embedjob.operator.pods import build_pod
    from embedjob.operator.views import ROLE_FINALIZE, ROLE_WORKER, job_view
    from embedjob.policy import ShardHistory

    done = create(dynamic, namespace, job_doc("a" * MAX_NAME_LENGTH, shards=100000),
                  dry_run=False)
    assert done.returncode == 0, done.stderr
    stored = json.loads(control_plane.kubectl(
        "get", "ej", "a" * MAX_NAME_LENGTH, "-n", namespace, "-o", "json").stdout)
    job = job_view(stored)
    for role, shard in ((ROLE_WORKER, 99999), (ROLE_FINALIZE, -1)):
        pod = build_pod(job, role, shard, 999, ShardHistory(), OperatorSettings())
        check = create(dynamic, namespace, pod)
        assert check.returncode == 0, check.stderr


def test_input_output_model_cannot_change(control_plane, dynamic, namespace) -> None:
    assert create(dynamic, namespace, job_doc("imm"), dry_run=False).returncode == 0
    changes = {
        "input": {"spec": {"input": {"uri": "other.fa"}}},
        "output": {"spec": {"output": {"uri": "elsewhere/"}}},
        "model": {"spec": {"model": {"pooling": "cls"}}},
    }
    for field, patch in changes.items():
        done = control_plane.kubectl("patch", "ej", "imm", "-n", namespace, "--type=merge",
                                     "-p", json.dumps(patch), check=False)
        assert done.returncode != 0, f"spec.{field} changed"
        assert f"spec.{field} is immutable" in done.stderr, done.stderr
    control_plane.kubectl("patch", "ej", "imm", "-n", namespace, "--type=merge",
                          "-p", json.dumps({"spec": {"shards": 4, "suspend": True}}))


def test_kubectl_get_shows_phase_shards_progress_eta(control_plane, dynamic,
                                                     namespace) -> None:
    assert create(dynamic, namespace, job_doc("cols"), dry_run=False).returncode == 0
    status = {"status": {"phase": "Running", "shardsReady": "3/10",
                         "progress": {"percent": 42.5, "eta": "5m10s"}}}
    control_plane.kubectl("patch", "ej", "cols", "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", json.dumps(status))
    header, row = control_plane.kubectl("get", "ej", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "SHARDS", "PROGRESS", "ETA", "AGE"]
    assert row.split()[:5] == ["cols", "Running", "3/10", "42.5", "5m10s"]


def test_kubectl_explain_describes_the_spec(control_plane, crd_installed) -> None:
    text = control_plane.kubectl("explain", "embeddingjob.spec").stdout
    for words in ("Number of shards", "The FASTA input", "Where embeddings go",
                  "GPUs, CPU and memory"):
        assert words in text, text
    text = control_plane.kubectl("explain", "embeddingjob.spec.resources.memory").stdout
    assert "quantity" in text


def test_a_minimal_job_is_stored_with_every_default(control_plane, dynamic,
                                                    namespace) -> None:
    """The server fills the same defaults pydantic does (so the operator sees one job)."""
    from embedjob.spec import dump_spec

    doc = job_doc("defaults")
    assert create(dynamic, namespace, copy.deepcopy(doc), dry_run=False).returncode == 0
    stored = json.loads(control_plane.kubectl(
        "get", "ej", "defaults", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"] == dump_spec(parse_job(doc).spec)
