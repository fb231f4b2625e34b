"""The EmbeddingJob's status schema, and the camelCase base of every model of the CRD.

:mod:`embedjob.spec` re-exports these names; :mod:`embedjob.status` builds the status.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )



class Phase(str, Enum):
    pending = "Pending"
    indexing = "Indexing"
    running = "Running"
    merging = "Merging"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


class ShardState(str, Enum):
    pending = "Pending"
    running = "Running"
    backoff = "Backoff"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""


class LastFailure(Model):
    type: str
    message: str
    time: str


class ShardEntry(Model):
    """One unfinished shard in the status manifest; finished shards are range strings and
    unremarkable started ones are summarised by status.shardAttempts."""

    shard: int
    state: ShardState = ShardState.pending
    attempt: int = 0
    pod: str | None = None
    done: int = 0
    total: int = 0
    batch_tokens: int | None = None
    precision: str | None = None
    failures: dict[str, int] = Field(default_factory=dict)
    last_failure: LastFailure | None = None
    quarantined: int = 0
    not_before: str | None = None
    # The policy history that must survive a vanished pod (pods carry it as an annotation).
    avoid_nodes: list[str] = Field(default_factory=list)
    isolate: list[str] = Field(default_factory=list)
    quarantine: list[str] = Field(default_factory=list)


class Progress(Model):
    done: int = 0
    total: int = 0
    percent: float = 0.0
    rate: float = 0.0
    eta_seconds: float | None = None
    eta: str | None = None


class Requests(Model):
    """What the operator did about requests on the job (``embedjob.io/restart``,
    ``embedjob.io/retry-failed``, damaged shards a finalize step reset): each annotation
    value is acted on once, and what a request left to do survives an operator restart."""

    restart: str | None = Field(None, description="The embedjob.io/restart value acted on last")
    retry_failed: str | None = Field(
        None, description="The embedjob.io/retry-failed value acted on last")
    restarting: bool = Field(
        False, description="A restart waits for the earlier run's pods to stop; then the "
        "index step deletes the output's index, checkpoints and results")
    finalize_from: int = Field(
        0, description="Finalize attempts below this are history (a retry, or shards reset)")
    resets: int = Field(0, description="Times a finalize step reset damaged shards")
    attempt_base: int = Field(
        0, description="After a restart, every step and shard starts at this attempt, so no "
        "pod name of the new run repeats one of the earlier run")
    last: str = Field("", description="The last request and what was done, in one line")


class EmbeddingJobStatus(Model):
    phase: Phase = Phase.pending
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    progress: Progress = Field(default_factory=Progress)
    shards_ready: str = Field("", description="Finished/all shards, e.g. '3/10' (printer column)")
    shards_done: str = Field("", description="Finished shards as ranges, e.g. '0-41,43'")
    shards_failed: str = ""
    shards_running: str = Field("", description="Shards whose pod is running, as ranges")
    shard_attempts: dict[str, str] = Field(
        default_factory=dict,
        description="Started, unfinished shards by current attempt, e.g. {'0': '0-9999'}: the "
        "record of shards summarised here instead of having a manifest entry",
    )
    shard_count: int = 0
    manifest: list[ShardEntry] = Field(
        default_factory=list,
        description="Entries of unfinished shards with something to tell (failures, "
        "overrides, backoff), most recent failures first when capped",
    )
    manifest_omitted: int = Field(
        0, description="Entries left out of manifest by its cap (manifest.json has all)"
    )
    message: str = ""
    requests: Requests = Field(
        default_factory=Requests, description="Requests acted on (restart, retry-failed)")


# --- loading -------------------------------------------------------------------------------
