"""What lets a reconcile pass cost O(changes) rather than O(shards). Pure.

Two pieces, both invisible in the result (a pass with them equals a pass without them):

* :class:`Entries`: the stored manifest with the shards that ``status.shardAttempts``
  summarises derived only when asked for, instead of one pydantic object per shard per pass.
* :class:`UnitMemo`: the last :class:`~embedjob.operator.steps.Unit` of each shard whose
  decision was *quiet* (nothing to create, delete or announce), with the inputs it was decided
  from and the time until which it cannot change
  (:func:`embedjob.operator.classify.quiet_until`). A later pass with the same inputs (the same
  pod view, progress and entry: identity first, so an unchanged pod costs a pointer compare)
  reuses it. A new heartbeat observation is an input only through "stuck": the caller says
  whether it changes anything (:meth:`UnitMemo.get`). Anything that acts is decided afresh
  every pass.

The memo is a cache of a pure function: it belongs to the caller (one per job in the
operator), and dropping it only makes the next pass slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from embedjob.operator.classify import quiet_until
from embedjob.ranges import range_set
from embedjob.spec import EmbeddingJobStatus, ShardEntry, ShardState

NameOf = Callable[[int, int], str]


class Entries(Mapping[int, ShardEntry]):
    """:func:`embedjob.status.expand_manifest` without building the summarised entries
    up front: the same keys and values, each derived (once) when read."""

    def __init__(self, status: EmbeddingJobStatus, name_of: NameOf) -> None:
        self.full = {e.shard: e for e in status.manifest}
        self.attempt_of: dict[int, int] = {}
        for key, ranges in status.shard_attempts.items():
            with contextlib.suppress(ValueError):
                attempt = int(key)
                for shard in range_set(ranges):
                    if shard not in self.full:
                        self.attempt_of.setdefault(shard, attempt)  # the first key wins
        self.running = range_set(status.shards_running)
        self.name_of = name_of
        self._derived: dict[int, ShardEntry] = {}

    def __getitem__(self, shard: int) -> ShardEntry:
        entry = self.full.get(shard) or self._derived.get(shard)
        if entry is not None:
            return entry
        attempt = self.attempt_of[shard]  # KeyError: not started
        state = ShardState.running if shard in self.running else ShardState.pending
        entry = ShardEntry(shard=shard, state=state, attempt=attempt,
                           pod=self.name_of(shard, attempt))
        self._derived[shard] = entry
        return entry

    def __contains__(self, shard: object) -> bool:
        return shard in self.full or shard in self.attempt_of

    def __iter__(self) -> Iterator[int]:
        yield from self.full
        yield from (s for s in self.attempt_of if s not in self.full)

    def __len__(self) -> int:
        return len(self.full) + sum(1 for s in self.attempt_of if s not in self.full)

    def key(self, shard: int) -> Any:
        """What the shard's entry is decided from, cheap to compare between passes."""
        entry = self.full.get(shard)
        if entry is not None:
            return entry
        attempt = self.attempt_of.get(shard)
        return None if attempt is None else (attempt, shard in self.running)

    def pods(self) -> Iterator[tuple[int, str]]:
        """(shard, pod of its current attempt) for every started shard, no entry built."""
        for shard, entry in self.full.items():
            if entry.pod:
                yield shard, entry.pod
        for shard, attempt in self.attempt_of.items():
            if shard not in self.full:
                yield shard, self.name_of(shard, attempt)


@dataclass(slots=True)
class _Hit:
    key: tuple[Any, ...]
    unit: Any  # steps.Unit (not imported: steps imports World from observe)
    until: datetime | None
    beat: Any = None  # the heartbeat observation it was last checked against


@dataclass
class UnitMemo:
    """Quiet units of one job from earlier passes, keyed by (role, shard)."""

    context: tuple[Any, ...] | None = None
    units: dict[tuple[str, int], _Hit] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def start(self, context: tuple[Any, ...]) -> None:
        """Begin a pass; anything decided under another spec, generation or setting goes."""
        if context != self.context:
            self.context = context
            self.units.clear()
        self.hits = self.misses = 0

    def unit_key(self, pod: Any, prog: Any, entry_key: Any, slots: int,
                 resuming: bool) -> tuple[Any, ...]:
        # Slots and resuming only matter to a unit without a pod (steps._without_pod).
        if pod is None:
            return (None, prog, entry_key, slots > 0, resuming)
        return (pod, prog, entry_key)

    def get(self, role: str, shard: int, key: tuple[Any, ...], now: datetime,
            beat: Any = None, quiet_beat: Callable[[Any], bool] | None = None) -> Any | None:
        """The unit kept for these inputs, else None. A heartbeat observation other than the
        one it was checked against is asked about: ``quiet_beat(beat)`` true keeps the unit.
        Every listing round observes every running shard anew (a fresh look, the beat
        unmoved): without this, 10^4 units would be decided and kept again each round."""
        hit = self.units.get((role, shard))
        if hit is None or hit.key != key or (hit.until is not None and now >= hit.until):
            self.misses += 1
            return None
        if hit.beat is not beat:
            if quiet_beat is None or not quiet_beat(beat):
                self.misses += 1
                return None
            hit.beat = beat
        self.hits += 1
        return hit.unit

    def put(self, role: str, shard: int, key: tuple[Any, ...], unit: Any, pod: Any,
            now: datetime, unsched_after: float, beat: Any = None) -> None:
        """Keep ``unit`` if it is quiet; forget the shard's earlier one either way."""
        quiet = not (unit.create or unit.delete or unit.events or unit.requeue is not None
                     or unit.unschedulable)
        if not quiet:
            self.units.pop((role, shard), None)
            return
        until = None
        if pod is not None and pod.active:
            until = quiet_until(pod, unsched_after)
            if until is not None and now >= until:
                self.units.pop((role, shard), None)
                return
        self.units[(role, shard)] = _Hit(key, unit, until, beat)
