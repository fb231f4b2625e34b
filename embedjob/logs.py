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


def log(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    out = stream or sys.stderr
    record = {"ts": round(time.time(), 3), "event": event, **_context, **fields}
    if out.isatty():
        extras = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("ts", "event"))
        stamp = time.strftime("%H:%M:%S", time.localtime(record["ts"]))
        out.write(f"{stamp} {event} {extras}\n")
    else:
        out.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
    out.flush()
