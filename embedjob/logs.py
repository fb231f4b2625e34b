"""Structured logs: one JSON object per line off a terminal, a readable line on one."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

_context: dict[str, Any] = {}


def bind(**fields: Any) -> None:
    """Fields added to every later line of this process (job, shard, attempt)."""
    _context.update({k: v for k, v in fields.items() if v is not None})


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


_PLAIN = {  # events a user sees on a terminal, in words rather than as event names
    "job.finalized": lambda r: f"finished: {_count(r.get('sequences'), 'sequence')} in "
                               f"{_count(r.get('shards'), 'shard')}",
}


def log(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    out = stream or sys.stderr
    record = {"ts": round(time.time(), 3), "event": event, **_context, **fields}
    if out.isatty():
        extras = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("ts", "event"))
        stamp = time.strftime("%H:%M:%S", time.localtime(record["ts"]))
        text = _PLAIN[event](record) if event in _PLAIN else f"{event} {extras}"
        out.write(f"{stamp} {text}\n")
    else:
        out.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
    out.flush()
