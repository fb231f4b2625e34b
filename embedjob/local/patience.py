"""Riding out a storage outage: the runner's own writes, retried with backoff, for a while.

The runner keeps going while the store is away (workers save nothing they cannot commit, and
retry on their own); what it must not do is end the run on the first failed status write.
:class:`Patience` is the bookkeeping: when the outage began, when to try again, when to give
up, and the one line to show at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedjob.times import duration

__all__ = ["DEFAULT_OUTAGE_SECONDS", "Patience", "duration"]

DEFAULT_OUTAGE_SECONDS = 600.0
"""How long ``embedjob run`` rides out a storage outage before stopping (``--storage-patience``)."""
FIRST_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 60.0


@dataclass
class Patience:
    """State of the current outage (none when ``since`` is None)."""

    limit: float = DEFAULT_OUTAGE_SECONDS
    since: float | None = None
    next_try: float = 0.0
    failures: int = 0

    def due(self, now: float) -> bool:
        """Try a write now? (Always outside an outage; on the backoff schedule inside one.)"""
        return self.since is None or now >= self.next_try

    def failed(self, now: float, error: str) -> tuple[bool, str]:
        """Record a failed write; (give up?, the line to show)."""
        if self.since is None:
            self.since = now
        self.failures += 1
        waited = now - self.since
        if waited >= self.limit:
            return True, (f"storage unavailable for {duration(waited)} ({error}); giving up "
                          "after saving the workers' progress: run again when it is back")
        delay = min(FIRST_RETRY_SECONDS * 2 ** (self.failures - 1), MAX_RETRY_SECONDS)
        self.next_try = now + delay
        return False, (f"storage unavailable ({error}); status not saved, retrying in "
                       f"{duration(delay)} (giving up after {duration(self.limit)})")

    def succeeded(self, now: float) -> str | None:
        """Record a successful write; the line to show if it ended an outage."""
        if self.since is None:
            return None
        waited, self.since, self.failures = now - self.since, None, 0
        return f"storage is back after {duration(waited)}; status saved"
