"""The EmbeddingJob resource: spec and status models, the one source of the CRD schema.

Field names are snake_case in Python and camelCase in YAML (``maxTokensPerBatch``).
Unknown fields are rejected so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from embedjob.failures import ConfigError, FailureType
from embedjob.status_model import (  # re-exported: the status is part of the job's schema
    Condition as Condition,
)
from embedjob.status_model import EmbeddingJobStatus as EmbeddingJobStatus
from embedjob.status_model import LastFailure as LastFailure
from embedjob.status_model import Model
from embedjob.status_model import Phase as Phase
from embedjob.status_model import Progress as Progress
from embedjob.status_model import ShardEntry as ShardEntry
from embedjob.status_model import ShardState as ShardState

API_GROUP = "embedjob.io"
API_VERSION = "v1alpha1"
KIND = "EmbeddingJob"
PLURAL = "embeddingjobs"

ESM2_MODELS = (
    "esm2_t6_8M_UR50D",
    "esm2_t12_35M_UR50D",
    "esm2_t30_150M_UR50D",
    "esm2_t33_650M_UR50D",
    "esm2_t36_3B_UR50D",
    "esm2_t48_15B_UR50D",
)
RANDOM_WEIGHTS = "random"
"""``model.weights: random`` loads random-initialised weights of the real architecture:
a smoke test of the whole pipeline without a model download (like vLLM's dummy weights)."""


MIN_TOKEN_BUDGET = 64
TokenBudget = Annotated[
    int | Literal["auto"],
    # Kubernetes' int-or-string: minimum applies to numbers, pattern to strings
    WithJsonSchema({
        "x-kubernetes-int-or-string": True, "minimum": MIN_TOKEN_BUDGET, "pattern": "^auto$"
    }),
]


NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 63
"""A job's name goes into its pods' ``embedjob.io/job`` label, and a label value has at most
63 characters. Kubernetes' own Job has the same limit for the same reason (its name goes into
the ``job-name`` label); a hash-suffixed label (as JobSet does for long names) would make pods
harder to find with ``-l embedjob.io/job=NAME``. Pod names ``NAME-SHARD-ATTEMPT`` and
``NAME-finalize-ATTEMPT`` stay far below the 253 characters a pod name may have."""

QUANTITY_PATTERN = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
"""Kubernetes' resource.Quantity grammar: a number, then a binary (Ki..Ei), decimal (n..E) or
exponent suffix. ``2GB`` is not a quantity (``2G`` or ``2Gi`` are)."""


def _positive_quantity(value: str) -> str:
    if not re.fullmatch(QUANTITY_PATTERN, value) or value.startswith("-") or not re.search(
        r"[1-9]", value.split("e")[0].split("E")[0]
    ):
        raise ValueError(
            f"{value!r} is not a positive Kubernetes quantity: use e.g. 4, 500m, 16Gi or 2G"
        )
    return value


Quantity = Annotated[str, Field(max_length=64), AfterValidator(_positive_quantity)]


class Alphabet(str, Enum):
    protein = "protein"
    dna = "dna"


class InputSpec(Model):
    uri: str | None = Field(None, description="FASTA file (plain or .gz): a path, file:// or s3://")
    uris: list[str] | None = Field(None, description="Several FASTA files, read in order")
    alphabet: Alphabet | None = Field(None, description="protein | dna (default: the model's)")

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if bool(self.uri) == bool(self.uris):
            raise ValueError("set exactly one of input.uri or input.uris")
        return self

    @property
    def all_uris(self) -> list[str]:
        return [self.uri] if self.uri else list(self.uris or [])


class OutputSpec(Model):
    uri: str = Field(description="Output prefix: a path, file:// or s3://bucket/prefix/")
    merge: bool = Field(False, description="Also write one merged embeddings.h5")
    dtype: Literal["float32", "float16"] = Field("float32", description="Stored embedding dtype")


class ModelSpec(Model):
    name: str = Field(
        "esm2_t6_8M_UR50D",
        description="esm2_t6_8M_UR50D … esm2_t48_15B_UR50D, dnabert-s, or a Hugging Face id",
    )
    weights: str | None = Field(
        None,
        description="fair-esm .pt checkpoint or Hugging Face snapshot (dir or .tar.gz): path or "
        "s3://; 'random' for random-initialised weights; unset: the hub cache",
    )
    layer: int = Field(-1, description="Representation layer; negative counts from the last")
    pooling: Literal["mean", "cls"] = Field("mean", description="mean over residues, or BOS/CLS")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU"
    )
    max_tokens_per_batch: TokenBudget = Field(
        16384,
        description="Token budget per batch (padded tokens), or 'auto': sized from the GPU's "
        "free memory and the model at start (on CPU: 16384)",
    )
    long_sequences: Literal["truncate", "window"] = Field(
        "truncate", description="Sequences longer than maxResidues: truncate, or average windows"
    )
    max_residues: int = Field(1022, ge=8, description="Residues per forward pass (model window)")
    window_overlap: int = Field(256, ge=0, description="Overlap between windows (window mode)")
    trust_remote_code: bool = Field(
        False, description="Allow a Hugging Face model's own code (e.g. DNABERT-S)"
    )

    @field_validator("max_tokens_per_batch", mode="plain")
    @classmethod
    def _token_budget(cls, value: object) -> int | str:
        if value == "auto":
            return "auto"
        # a quoted number is refused, as the API server refuses it (int-or-string)
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if number is None or number < MIN_TOKEN_BUDGET:
            raise ValueError(f"use a number of tokens >= {MIN_TOKEN_BUDGET}, or auto")
        return number

    @model_validator(mode="after")
    def _overlap_fits(self) -> ModelSpec:
        if self.window_overlap >= self.max_residues:
            raise ValueError("model.windowOverlap must be smaller than model.maxResidues")
        return self

    @model_validator(mode="after")
    def _known_name(self) -> ModelSpec:
        # A Hugging Face id has an owner ("org/name"); a bare name must be one we know, so a
        # typo such as "esm2_t6_8M" fails here rather than after a pod has started.
        known = (*ESM2_MODELS, "dnabert-s")
        if self.name in known or "/" in self.name:
            return self
        if self.weights and not self.name.lower().startswith("esm"):
            return self  # a local Hugging Face snapshot named by the user
        raise ValueError(
            f"unknown model {self.name!r}: use one of {', '.join(known)} "
            "or a Hugging Face id such as 'facebook/esm2_t6_8M_UR50D'"
        )

    @model_validator(mode="after")
    def _layer_fits(self) -> ModelSpec:
        layers = self.esm2_layers
        if layers is not None and not -(layers + 1) <= self.layer <= layers:
            raise ValueError(
                f"model.layer {self.layer} is out of range for {self.name} ({layers} layers): "
                f"use 0..{layers}, or -1 (the last) .. -{layers + 1}"
            )
        return self

    @property
    def is_esm2(self) -> bool:
        return self.name in ESM2_MODELS

    @property
    def esm2_layers(self) -> int | None:
        """Transformer layers of a named ESM-2 (``esm2_t33_…`` has 33); None otherwise."""
        return int(self.name.split("_")[1][1:]) if self.is_esm2 else None

    @property
    def canonical_layer(self) -> int:
        """The layer as a non-negative index where the model is known (-1 and 6 are one)."""
        layers = self.esm2_layers
        return self.layer + layers + 1 if layers is not None and self.layer < 0 else self.layer


class CheckpointSpec(Model):
    every_sequences: int = Field(10000, ge=1, description="Commit a part every N sequences")
    every_seconds: float = Field(300, gt=0, description="…or every T seconds, whichever first")
    shutdown_deadline_seconds: float = Field(
        20, gt=0, description="After SIGTERM, wait at most this long for the final upload"
    )


class RetrySpec(Model):
    """Attempt budgets per failure type; only attempts that committed nothing new count."""

    preempted: int = Field(100, ge=0, description="Cap on preemptions in a row without progress")
    gpu_oom: int = Field(4, ge=0)
    host_oom: int = Field(2, ge=0)
    cuda_error: int = Field(2, ge=0)
    numerical: int = Field(2, ge=0)
    storage_error: int = Field(5, ge=0, description="Transient storage errors")
    stuck: int = Field(3, ge=0)
    generic: int = Field(3, ge=0)
    node_admission: int = Field(
        20, ge=1, description="Kubelet admission refusals in a row (each on another node)"
    )
    disk: int = Field(3, ge=0, description="Evictions for ephemeral storage (/cache too small)")
    backoff_seconds: float = Field(10, ge=0, description="First backoff; doubles per attempt")
    max_backoff_seconds: float = Field(600, ge=0)
    quarantine: bool = Field(
        True, description="Quarantine sequences that crash the model twice, and go on"
    )

    def budget(self, failure: FailureType) -> int:
        return int(getattr(self, failure.value, 0))


class ResourcesSpec(Model):
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per worker pod")
    cpu: Quantity = Field("4", description="CPU request per pod (a quantity: 4, 500m)")
    memory: Quantity = Field(
        "16Gi", description="Memory request and limit per pod (a quantity: 16Gi, 2G)"
    )


class StorageSpec(Model):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO…)")
    region: str | None = None
    credentials_secret: str | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (else IRSA)"
    )


class EmbeddingJobSpec(Model):
    input: InputSpec = Field(description="The FASTA input (immutable)")
    output: OutputSpec = Field(description="Where embeddings go (immutable)")
    model: ModelSpec = Field(
        default_factory=ModelSpec, description="The model and how it runs (immutable)"
    )
    shards: int = Field(1, ge=1, le=100000, description="Number of shards (worker pods)")
    parallelism: int | None = Field(None, ge=1, description="Shards running at once (default all)")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="How often workers commit their output"
    )
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Attempt budgets per failure")
    suspend: bool = Field(False, description="Stop all pods (they checkpoint); false resumes")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="GPUs, CPU and memory per worker pod"
    )
    image: str | None = Field(None, description="Worker image (default: the operator's setting)")
    template: dict[str, Any] | None = Field(
        None,
        description="Pod template fragment merged into worker pods (nodeSelector, tolerations, "
        "affinity, priorityClassName, serviceAccountName, env, volumes)",
    )
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="S3 endpoint, region and credentials"
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job (and its pods) this many seconds after it "
        "Succeeded or Failed; unset: keep it (as batch/v1 Job's field)"
    )

    @property
    def effective_parallelism(self) -> int:
        return min(self.parallelism or self.shards, self.shards)


class Metadata(Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)
    namespace: str | None = None


class EmbeddingJob(Model):
    api_version: Literal["embedjob.io/v1alpha1"] = "embedjob.io/v1alpha1"
    kind: Literal["EmbeddingJob"] = "EmbeddingJob"
    metadata: Metadata
    spec: EmbeddingJobSpec


# --- status ------------------------------------------------------------------------------


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "__root__") or "spec"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; fields are camelCase)"
    elif first["type"] == "literal_error" or first["type"] == "enum":
        msg = f"{msg}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"invalid EmbeddingJob: {where}: {msg}{more}"


def parse_job(doc: Any) -> EmbeddingJob:
    """Validate a parsed YAML document; raise ConfigError with a one-line message."""
    if not isinstance(doc, dict):
        raise ConfigError("invalid EmbeddingJob: expected a mapping with apiVersion, kind, spec")
    try:
        return EmbeddingJob.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def parse_spec(spec: Any) -> EmbeddingJobSpec:
    """Validate a bare spec (as the operator receives it)."""
    try:
        return EmbeddingJobSpec.model_validate(spec)
    except ValidationError as err:
        message = _format_error(err).replace("EmbeddingJob: ", "EmbeddingJob: spec.", 1)
        raise ConfigError(message) from None


def load_job(path: str | Path) -> EmbeddingJob:
    """Read an EmbeddingJob YAML file (the same one ``kubectl apply`` takes)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read job file {path}: {err.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_job(doc)


def dump_spec(spec: EmbeddingJobSpec) -> dict[str, Any]:
    """The spec as camelCase JSON-ready data (what a pod receives)."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)
