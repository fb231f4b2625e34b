"""The retry policy: what to do after an attempt of a shard stops, as a pure function.

Both runners (the operator and ``embedjob run``) call :func:`decide` with the shard's
history and the classified failure of the attempt that just ended, store the returned
history, and start the next attempt with the overrides it carries (see :func:`worker_env`).

Budgets (``spec.retry``): a budget of N means the N-th counted failure of that type fails
the shard (``cudaError: 2`` = at most two attempts). Only attempts that committed no new
checkpoint part are counted; an attempt that made progress resets every counter, so a long
shard on a flaky spot pool is never failed for moving forward slowly. Preemption never
spends a budget: ``retry.preempted`` only caps preemptions *in a row without progress*.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from embedjob.batch_order import parse_run, within
from embedjob.failures import Failure, FailureType
from embedjob.spec import EmbeddingJobSpec

MIN_TOKENS_PER_BATCH = 256
"""Floor of the token budget after OOMs (capped by the spec's own value)."""
AUTO_FALLBACK_TOKENS = 16384
"""``maxTokensPerBatch: auto`` when the failed attempt did not report its budget (killed)."""
MAX_AVOIDED_NODES = 16
"""Anti-affinity lists stay short: a pool with more bad nodes has a different problem."""
MAX_POISON_STEPS = 8
"""Bisect/quarantine steps in a row without progress before the shard gives up."""
MAX_ISOLATED_RUNS = 16
"""Runs of positions kept in ``isolate`` (the newest): each is a few bytes."""
PRECISION_LADDER = ("fp16", "bf16", "fp32")

_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class ShardHistory:
    """What the policy remembers about one shard between attempts (plain, serialisable)."""

    attempts: int = 0
    """Attempts started so far; the runner bumps it when it starts one (decide does not)."""
    failures: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    """Counted failures by FailureType value (attempts that made no progress)."""
    preemptions_in_a_row: int = 0
    max_tokens: int | None = None
    """Token-budget override for the next attempt (None: the spec's value)."""
    precision: str | None = None
    """Precision override for the next attempt (None: the spec's value)."""
    avoid_nodes: tuple[str, ...] = ()
    suspects: tuple[str, ...] = ()
    """The run of positions (:mod:`embedjob.batch_order`, e.g. ``"120-134"``) of the batch
    that crashed the model last time, to recognise a repeat; a few bytes, whatever the ids."""
    isolate: tuple[str, ...] = ()
    """Runs of positions whose sequences the next attempt runs one per batch (bisecting a
    batch that crashed twice)."""
    quarantined: tuple[str, ...] = ()
    """Ids left out of the shard for good (listed in the shard's done.json/manifest); one per
    poison step, at most ``MAX_POISON_STEPS`` in a row without progress."""

    def count(self, kind: FailureType) -> int:
        return int(self.failures.get(kind.value, 0))

    def to_json(self) -> str:
        """Compact JSON (defaults left out): fits a pod annotation or a status field."""
        data: dict[str, Any] = {}
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            if name == "failures":
                value = {k: v for k, v in value.items() if v}
            elif isinstance(value, tuple):
                value = list(value)
            if value != default and value not in ({}, []):
                data[name] = value
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> ShardHistory:
        """Read :meth:`to_json` back; empty or unreadable text gives a fresh history."""
        try:
            data = json.loads(text or "{}")
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        kwargs: dict[str, Any] = {}
        for name in _DEFAULTS:
            if name not in data:
                continue
            value = data[name]
            if name == "failures":
                value = MappingProxyType({str(k): int(v) for k, v in dict(value).items()})
            elif isinstance(_DEFAULTS[name], tuple):
                value = tuple(str(v) for v in value)
            kwargs[name] = value
        return cls(**kwargs)


_DEFAULTS: dict[str, Any] = {
    "attempts": 0,
    "failures": {},
    "preemptions_in_a_row": 0,
    "max_tokens": None,
    "precision": None,
    "avoid_nodes": (),
    "suspects": (),
    "isolate": (),
    "quarantined": (),
}


@dataclass(frozen=True)
class Decision:
    """The policy's answer: retry (after ``delay_seconds``) or fail, and why, in one line."""

    action: Literal["retry", "fail"]
    delay_seconds: float
    reason: str
    history: ShardHistory
    isolate: tuple[str, ...] = ()

    @property
    def retry(self) -> bool:
        return self.action == "retry"


def decide(
    spec: EmbeddingJobSpec, history: ShardHistory, failure: Failure, made_progress: bool
) -> Decision:
    """Decide what follows a stopped attempt. Pure: same inputs, same decision."""
    base = _reset(history) if made_progress else history
    handler = _HANDLERS.get(failure.type, _generic)
    return handler(spec, base, failure, made_progress)


def worker_env(history: ShardHistory) -> dict[str, str]:
    """The policy's overrides as the worker's environment variables (unset when default)."""
    env: dict[str, str] = {}
    if history.max_tokens is not None:
        env["EMBEDJOB_MAX_TOKENS_PER_BATCH"] = str(history.max_tokens)
    if history.precision is not None:
        env["EMBEDJOB_PRECISION"] = history.precision
    if history.quarantined:
        env["EMBEDJOB_QUARANTINE"] = json.dumps(list(history.quarantined))
    if history.isolate:
        env["EMBEDJOB_ISOLATE"] = json.dumps(list(history.isolate))
    return env


# --- helpers ------------------------------------------------------------------------------


def _reset(history: ShardHistory) -> ShardHistory:
    """Progress was made: counters start over, learned overrides stay."""
    return replace(history, failures=_EMPTY, preemptions_in_a_row=0)


def _counted(history: ShardHistory, kind: FailureType, made_progress: bool) -> ShardHistory:
    counts = dict(history.failures)
    if not made_progress:
        counts[kind.value] = counts.get(kind.value, 0) + 1
    return replace(history, failures=MappingProxyType(counts), preemptions_in_a_row=0)


def _over_budget(spec: EmbeddingJobSpec, history: ShardHistory, kind: FailureType) -> bool:
    return history.count(kind) >= spec.retry.budget(kind)


def _backoff(spec: EmbeddingJobSpec, failures: int) -> float:
    """backoffSeconds, doubled per counted failure after the first, capped."""
    exponent = max(0, failures - 1)
    delay = spec.retry.backoff_seconds * (2 ** min(exponent, 30))
    return float(min(delay, spec.retry.max_backoff_seconds))


def _fail(history: ShardHistory, reason: str) -> Decision:
    return Decision("fail", 0.0, reason, history)


def _retry(history: ShardHistory, reason: str, delay: float = 0.0) -> Decision:
    return Decision("retry", delay, reason, history, isolate=history.isolate)


def _gave_up(spec: EmbeddingJobSpec, kind: FailureType, failure: Failure) -> str:
    budget = spec.retry.budget(kind)
    return f"{kind.value} {budget} time(s) without progress: {failure.message}".strip()


def _tokens(spec: EmbeddingJobSpec, history: ShardHistory, failure: Failure) -> int:
    """The budget the failed attempt ran at: as it reported it (``auto`` chose it), else the
    override it was given, else the spec's number (``auto`` unreported: the CPU default)."""
    configured = spec.model.max_tokens_per_batch
    fallback = configured if isinstance(configured, int) else AUTO_FALLBACK_TOKENS
    return failure.batch_tokens or history.max_tokens or fallback


def _floor(spec: EmbeddingJobSpec) -> int:
    configured = spec.model.max_tokens_per_batch
    return min(MIN_TOKENS_PER_BATCH, configured) if isinstance(configured, int) else (
        MIN_TOKENS_PER_BATCH)


# --- one handler per failure type ---------------------------------------------------------


def _preempted(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    in_a_row = 0 if progress else h.preemptions_in_a_row + 1
    h = replace(h, preemptions_in_a_row=in_a_row)
    if in_a_row >= max(spec.retry.preempted, 1) and not progress:
        return _fail(h, f"preempted {in_a_row} times in a row without progress")
    return _retry(h, f"preempted ({f.message}); recreating at once".replace(" ()", ""))


def _oom(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    h = _counted(h, f.type, progress)
    current = _tokens(spec, h, f)
    smaller = max(_floor(spec), current // 2)
    if _over_budget(spec, h, f.type):
        return _fail(h, _gave_up(spec, f.type, f))
    if smaller == current and not progress:
        return _fail(h, f"{f.type.value} at the smallest token budget ({current}): {f.message}")
    h = replace(h, max_tokens=smaller)
    what = "GPU" if f.type is FailureType.gpu_oom else "host"
    return _retry(h, f"{what} out of memory; retrying with maxTokensPerBatch {smaller}")


def _numerical(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    h = _counted(h, f.type, progress)
    # The precision the attempt ran at, as it reported it (what ``auto`` resolved to).
    current = f.precision or h.precision or spec.model.precision
    if current not in PRECISION_LADDER:  # ``auto`` unreported (killed): the GPU default
        current = "fp16"
    if current == "fp32":
        return _fail(h, f"NaN/Inf even in fp32: {f.message}".strip())
    if _over_budget(spec, h, f.type):
        return _fail(h, _gave_up(spec, f.type, f))
    safer = PRECISION_LADDER[PRECISION_LADDER.index(current) + 1]
    h = replace(h, precision=safer)
    return _retry(h, f"NaN/Inf in {current} embeddings; retrying in {safer}")


def _cuda(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    poison = _poison_step(spec, h, f, progress)
    if poison is not None:
        return poison
    h = _counted(h, FailureType.cuda_error, progress)
    h = replace(h, suspects=(f.rows,) if parse_run(f.rows) else ())
    if f.node and f.node not in h.avoid_nodes:
        h = replace(h, avoid_nodes=(*h.avoid_nodes, f.node)[-MAX_AVOIDED_NODES:])
    if _over_budget(spec, h, FailureType.cuda_error):
        return _fail(h, _gave_up(spec, FailureType.cuda_error, f))
    away = f" away from node {f.node}" if f.node else ""
    return _retry(h, f"CUDA error ({f.message}); retrying{away}")


def _poison_step(
    spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool
) -> Decision | None:
    """Bisect a batch that crashed twice, quarantine a single sequence; None: not a repeat.
    The batch is known by its run of positions (``f.rows``), never by its ids."""
    span = parse_run(f.rows)
    if span is None:
        return None
    repeat = f.type is FailureType.poison_input or within(f.rows, h.suspects)
    single = span[0] == span[1]
    if not (repeat or (single and within(f.rows, h.isolate))):
        return None
    h = _counted(h, FailureType.poison_input, progress)
    what = _names(f.ids) if f.ids else f"at position(s) {f.rows} of the shard's batch order"
    if not spec.retry.quarantine:
        return _fail(h, f"sequence(s) {what} crash the model; remove them or enable "
                        "retry.quarantine")
    if h.count(FailureType.poison_input) >= MAX_POISON_STEPS:
        return _fail(h, f"gave up bisecting crashing sequences {what}: {f.message}")
    if single and len(f.ids) != 1:  # its id did not fit in the 4 KiB termination message
        return _fail(h, f"the sequence {what} crashes the model and its id is too long to "
                        "quarantine; remove it from the input")
    if single:
        h = replace(h, quarantined=(*h.quarantined, f.ids[0]), suspects=())
        return _retry(h, f"sequence {f.ids[0]} crashes the model; quarantined, continuing")
    runs = tuple(dict.fromkeys((*h.isolate, f.rows)))[-MAX_ISOLATED_RUNS:]
    h = replace(h, isolate=runs, suspects=())
    return _retry(h, f"the batch at positions {f.rows} crashed twice; running its sequences "
                     "one by one")


def _names(ids: tuple[str, ...]) -> str:
    shown = ", ".join(ids[:3])
    return shown + (f" (+{len(ids) - 3} more)" if len(ids) > 3 else "")


def _input(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    return _fail(_counted(h, f.type, progress), f.message or "input error")


def _storage(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    h = _counted(h, f.type, progress)
    if not f.transient:
        return _fail(h, f.message or "permanent storage error")
    if _over_budget(spec, h, f.type):
        return _fail(h, _gave_up(spec, f.type, f))
    delay = _backoff(spec, h.count(f.type))
    return _retry(h, f"transient storage error ({f.message}); retrying in {delay:g}s", delay)


def _stuck(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    h = _counted(h, f.type, progress)
    if _over_budget(spec, h, f.type):
        return _fail(h, _gave_up(spec, f.type, f))
    return _retry(h, f"no progress ({f.message}); replacing the pod".replace(" ()", ""))


def _unschedulable(
    spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool
) -> Decision:
    # Waiting is the runner's job; nothing is learned and nothing is spent.
    return _retry(h, f"unschedulable ({f.message}); waiting".replace(" ()", ""))


def _avoid(h: ShardHistory, node: str | None) -> ShardHistory:
    if not node or node in h.avoid_nodes:
        return h
    return replace(h, avoid_nodes=(*h.avoid_nodes, node)[-MAX_AVOIDED_NODES:])


def _admission(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    """The kubelet refused the pod before it ran (a GPU node whose device plugin is not ready
    yet, resources taken in a race): the shard is not at fault, so no budget of its own work
    is spent; the pod is recreated at once away from that node (no delay: a refused pod has
    no finish time to count a backoff from, and the avoided nodes already keep it from
    looping on one node), and only ``retry.nodeAdmission`` refusals without progress fail the
    shard."""
    counts = dict(h.failures)
    counts[f.type.value] = counts.get(f.type.value, 0) + 1
    h = _avoid(replace(h, failures=MappingProxyType(counts)), f.node)
    n = h.count(f.type)
    if n >= spec.retry.node_admission:
        return _fail(h, f"refused by the kubelet {n} times without progress (last: "
                        f"{f.message}); check the nodes' device plugins and allocatable resources")
    away = f" away from node {f.node}" if f.node else ""
    return _retry(h, f"refused at admission ({f.message}); recreating{away}")


def _disk(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    """Evicted for ephemeral storage: not a preemption (the same pod would fill the same
    disk again), so it has its own budget; the node is avoided in case its disk was full."""
    h = _avoid(_counted(h, f.type, progress), f.node)
    if _over_budget(spec, h, f.type):
        return _fail(h, f"{_gave_up(spec, f.type, f)}; raise the operator's "
                        "workerDefaults.cacheSizeLimit and ephemeralStorage")
    delay = _backoff(spec, h.count(f.type))
    return _retry(h, f"evicted for disk ({f.message}); retrying in {delay:g}s", delay)


def _generic(spec: EmbeddingJobSpec, h: ShardHistory, f: Failure, progress: bool) -> Decision:
    h = _counted(h, FailureType.generic, progress)
    if _over_budget(spec, h, FailureType.generic):
        return _fail(h, _gave_up(spec, FailureType.generic, f))
    delay = _backoff(spec, h.count(FailureType.generic))
    return _retry(h, f"failed ({f.message}); retrying in {delay:g}s", delay)


_HANDLERS = {
    FailureType.preempted: _preempted,
    FailureType.gpu_oom: _oom,
    FailureType.host_oom: _oom,
    FailureType.numerical: _numerical,
    FailureType.cuda_error: _cuda,
    FailureType.poison_input: _cuda,
    FailureType.input_error: _input,
    FailureType.storage_error: _storage,
    FailureType.stuck: _stuck,
    FailureType.unschedulable: _unschedulable,
    FailureType.node_admission: _admission,
    FailureType.disk: _disk,
    FailureType.generic: _generic,
}
