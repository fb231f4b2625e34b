"""Fault injection for tests: off unless ``EMBEDJOB_FAILPOINTS`` is set.

Syntax: ``;``-separated points, each ``action:key=value,key=value``. Conditions: ``batch``
(0-based batch number within the attempt), ``attempt``, ``shard``, ``id`` (the batch holds
this sequence id), ``times`` (fire at most N times per process). A point with ``stage``
(``loading``, ``resuming``, ``publishing``; ``indexing`` in ``embedjob run``) fires on
entering that stage instead, and one with ``pass`` (0-based forward pass of the attempt,
inside batches) before that forward pass; both only ``stall`` or ``die``. Actions:

- ``gpu_oom``, ``cuda_error``, ``storage_error``: raise the failure the real path raises
- ``nan``: poison the batch's embeddings with NaN (caught by the finiteness check)
- ``stall``: sleep ``seconds`` (default 3600) before the batch
- ``die``: exit at once with ``code`` (default 137), as a kill would, skipping every cleanup
- ``hog``: allocate host memory before the batch, 64 MiB at a time, until a memory limit's
  OOM killer ends the process (a real OOMKilled on a real node)

Example: ``EMBEDJOB_FAILPOINTS="gpu_oom:batch=2,attempt=0;die:batch=5,attempt=1"``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from embedjob.failures import CudaError, GpuOutOfMemory, TransientStorageError

ACTIONS = ("gpu_oom", "cuda_error", "storage_error", "nan", "stall", "die", "hog")


@dataclass
class Failpoint:
    action: str
    params: dict[str, str]
    fired: int = field(default=0)

    def matches(self, batch: int, attempt: int, shard: int, ids: list[str]) -> bool:
        p = self.params
        if "times" in p and self.fired >= int(p["times"]):
            return False
        checks = (
            ("batch", str(batch)),
            ("attempt", str(attempt)),
            ("shard", str(shard)),
        )
        if any(k in p and p[k] != v for k, v in checks):
            return False
        return "id" not in p or p["id"] in ids


def parse(text: str) -> list[Failpoint]:
    points = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        action, _, rest = chunk.partition(":")
        if action not in ACTIONS:
            raise ValueError(f"unknown failpoint action {action!r}; known: {', '.join(ACTIONS)}")
        params = dict(kv.split("=", 1) for kv in filter(None, rest.split(",")))
        points.append(Failpoint(action, params))
    return points


class Failpoints:
    """The points active in this process, evaluated around each batch."""

    def __init__(self, points: list[Failpoint], shard: int, attempt: int) -> None:
        self.points, self.shard, self.attempt = points, shard, attempt

    @classmethod
    def from_env(cls, shard: int, attempt: int) -> Failpoints:
        return cls(parse(os.environ.get("EMBEDJOB_FAILPOINTS", "")), shard, attempt)

    def _fire(self, batch: int, ids: list[str], actions: tuple[str, ...]) -> list[Failpoint]:
        hits = [
            p
            for p in self.points
            if p.action in actions and not {"stage", "pass"} & p.params.keys()
            and p.matches(batch, self.attempt, self.shard, ids)
        ]
        for p in hits:
            p.fired += 1
        return hits

    def at(self, key: str, value: object) -> None:
        """Stall or die where a ``stage=`` or ``pass=`` point says (no batch conditions)."""
        hits = [p for p in self.points if p.action in ("stall", "die")
                and p.params.get(key) == str(value) and p.matches(-1, self.attempt, self.shard, [])
                and "batch" not in p.params]
        for p in hits:
            p.fired += 1
            if p.action == "stall":
                time.sleep(float(p.params.get("seconds", 3600)))
            else:
                os._exit(int(p.params.get("code", 137)))

    def before_batch(self, batch: int, ids: list[str]) -> None:
        actions = ("stall", "die", "hog", "gpu_oom", "cuda_error", "storage_error")
        for p in self._fire(batch, ids, actions):
            where = f"failpoint at batch {batch}"
            if p.action == "stall":
                time.sleep(float(p.params.get("seconds", 3600)))
            elif p.action == "die":
                os._exit(int(p.params.get("code", 137)))
            elif p.action == "hog":
                _hog()
            elif p.action == "gpu_oom":
                raise GpuOutOfMemory(f"CUDA out of memory ({where})")
            elif p.action == "cuda_error":
                raise CudaError(f"CUDA error: device-side assert triggered ({where})", ids=ids)
            else:
                raise TransientStorageError(f"storage unavailable ({where})")

    def after_batch(self, batch: int, ids: list[str], embeddings: np.ndarray) -> None:
        if self._fire(batch, ids, ("nan",)):
            embeddings[0, 0] = np.nan


def _hog() -> None:
    """Touch every page so the memory is really charged to the cgroup."""
    held = []
    while True:
        held.append(np.ones(64 << 20, dtype=np.uint8))
