"""Failure taxonomy: why a worker stopped, as a type, an exit code and a termination message.

The worker writes one JSON line to its termination-message file and exits with the type's
code; the operator and the local runner read both back with :func:`classify_exit`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class FailureType(str, Enum):
    preempted = "preempted"
    poison_input = "poison_input"
    gpu_oom = "gpu_oom"
    host_oom = "host_oom"
    cuda_error = "cuda_error"
    numerical = "numerical"
    input_error = "input_error"
    storage_error = "storage_error"
    stuck = "stuck"
    generic = "generic"
    unschedulable = "unschedulable"
    node_admission = "node_admission"
    """The kubelet refused the pod before it ran (UnexpectedAdmissionError, OutOf<resource>)."""
    disk = "disk"
    """Evicted for ephemeral storage: /cache over its limit, or the node's disk full."""


# Exit codes: 143/137 are what the kernel gives for SIGTERM/SIGKILL; the rest follow
# sysexits.h where one fits and a private 80+ range for GPU failures.
EXIT_OK = 0
EXIT_GENERIC = 1
EXIT_INPUT = 65  # EX_DATAERR
EXIT_CONFIG = 78  # EX_CONFIG: also an input_error
EXIT_STORAGE = 74  # EX_IOERR: permanent storage failure
EXIT_STORAGE_TRANSIENT = 75  # EX_TEMPFAIL
EXIT_GPU_OOM = 80
EXIT_CUDA = 81
EXIT_NUMERICAL = 82
EXIT_POISON = 83
EXIT_HOST_OOM = 137
EXIT_PREEMPTED = 143

_TYPE_BY_EXIT = {
    EXIT_INPUT: FailureType.input_error,
    EXIT_CONFIG: FailureType.input_error,
    EXIT_STORAGE: FailureType.storage_error,
    EXIT_STORAGE_TRANSIENT: FailureType.storage_error,
    EXIT_GPU_OOM: FailureType.gpu_oom,
    EXIT_CUDA: FailureType.cuda_error,
    EXIT_NUMERICAL: FailureType.numerical,
    EXIT_POISON: FailureType.poison_input,
    EXIT_HOST_OOM: FailureType.host_oom,
    EXIT_PREEMPTED: FailureType.preempted,
}

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096  # kubelet keeps at most 4 KiB


class EmbedjobError(Exception):
    """An expected failure: one line for the user, a type and an exit code for the policy."""

    failure = FailureType.generic
    exit_code = EXIT_GENERIC

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message.replace("\n", " "))
        self.details = details

    @property
    def message(self) -> str:
        return str(self)


class InputError(EmbedjobError):
    """The input cannot be embedded as given (malformed FASTA, bad residues, …)."""

    failure = FailureType.input_error
    exit_code = EXIT_INPUT


class ConfigError(EmbedjobError):
    """The EmbeddingJob or the model/weights named by it are invalid."""

    failure = FailureType.input_error
    exit_code = EXIT_CONFIG


class StorageError(EmbedjobError):
    """Permanent storage failure: denied, no such bucket, unwritable path."""

    failure = FailureType.storage_error
    exit_code = EXIT_STORAGE
    transient = False


class TransientStorageError(StorageError):
    """Throttling or 5xx that outlived botocore's own retries."""

    exit_code = EXIT_STORAGE_TRANSIENT
    transient = True


class Preempted(EmbedjobError):
    """SIGTERM arrived; progress was saved."""

    failure = FailureType.preempted
    exit_code = EXIT_PREEMPTED


class GpuOutOfMemory(EmbedjobError):
    failure = FailureType.gpu_oom
    exit_code = EXIT_GPU_OOM


class CudaError(EmbedjobError):
    failure = FailureType.cuda_error
    exit_code = EXIT_CUDA


class NumericalError(EmbedjobError):
    failure = FailureType.numerical
    exit_code = EXIT_NUMERICAL


class PoisonInput(EmbedjobError):
    """A batch crashed the model twice (the suspects: the batch's ``rows``)."""

    failure = FailureType.poison_input
    exit_code = EXIT_POISON


@dataclass(frozen=True)
class TerminationMessage:
    """What a worker says about why it stopped (one JSON line, under 4 KiB)."""

    type: str
    message: str
    committed: int = 0
    done_this_attempt: int = 0
    batch: int | None = None
    transient: bool = False
    ids: list[str] = field(default_factory=list)
    """The batch's sequence ids, for people (left out when they do not fit in 4 KiB)."""
    rows: str | None = None
    """The batch's run of positions in the shard's batch order (:mod:`embedjob.batch_order`),
    e.g. ``"120-134"``: what poison bisection works from, whatever the ids' length."""
    batch_tokens: int | None = None
    """The token budget the attempt ran at (what ``auto`` chose): the OOM policy halves it."""
    precision: str | None = None
    """The precision the attempt ran at (what ``auto`` resolved): NaN/Inf moves one up."""
    shards: int | None = None
    sequences: int | None = None
    """A finished index step's summary: the operator takes the shard count from the pod,
    with no storage read (so a job whose output it may not read still runs)."""
    reset_shards: list[int] = field(default_factory=list)
    """Finished shards a finalize step found damaged and reset (to be embedded again)."""

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v not in (None, [], False)}
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode()) > MAX_TERMINATION_MESSAGE:
            data.pop("ids", None)
            data["message"] = data["message"][:1000]
            text = json.dumps(data, separators=(",", ":"))
        return text

    @classmethod
    def from_json(cls, text: str | None) -> TerminationMessage | None:
        if not text:
            return None
        try:
            data = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None
        if not isinstance(data, dict) or "type" not in data:
            return None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{"message": "", **known})


def write_termination_message(msg: TerminationMessage, path: str | None = None) -> None:
    """Best effort: outside a pod the default path is usually not writable."""
    target = Path(path or os.environ.get("EMBEDJOB_TERMINATION_LOG", DEFAULT_TERMINATION_LOG))
    with contextlib.suppress(OSError):
        target.write_text(msg.to_json())


@dataclass(frozen=True)
class Failure:
    """A classified stop of one attempt."""

    type: FailureType
    message: str
    transient: bool = False
    node: str | None = None
    ids: tuple[str, ...] = ()
    batch_tokens: int | None = None
    precision: str | None = None
    rows: str = ""
    """The crashed batch's run of positions in the shard's batch order (``""``: none)."""


def classify_exit(exit_code: int | None, message: TerminationMessage | None) -> Failure:
    """Classify a worker's exit from its code and termination message alone."""
    if message is not None:
        try:
            kind = FailureType(message.type)
        except ValueError:
            kind = FailureType.generic
        return Failure(kind, message.message, message.transient, ids=tuple(message.ids),
                       batch_tokens=message.batch_tokens, precision=message.precision,
                       rows=message.rows or "")
    if exit_code is not None and exit_code < 0:  # a local process killed by a signal
        exit_code = 128 - exit_code
    kind = _TYPE_BY_EXIT.get(exit_code or EXIT_GENERIC, FailureType.generic)
    transient = exit_code == EXIT_STORAGE_TRANSIENT
    return Failure(kind, f"worker exited with code {exit_code}", transient)
