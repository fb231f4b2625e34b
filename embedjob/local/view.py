"""What ``embedjob run`` shows: a live table on a terminal, JSON log lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections import deque

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from embedjob.local.scheduler import Shard, progress_of
from embedjob.logs import log
from embedjob.spec import ShardState

LOG_EVERY_SECONDS = 10.0
MAX_ROWS = 20

_STYLE = {
    ShardState.succeeded: "green",
    ShardState.failed: "red",
    ShardState.backoff: "yellow",
    ShardState.running: "cyan",
    ShardState.pending: "dim",
}


class View:
    """Plain view: one JSON line per event and a progress line every few seconds."""

    def __init__(self) -> None:
        self._last = 0.0

    @staticmethod
    def for_terminal() -> View:
        return LiveView() if sys.stderr.isatty() else View()

    def start(self, job: str, shards: list[Shard], workers: int) -> None:
        log("job.start", job=job, shards=len(shards), workers=workers)

    def update(self, shards: list[Shard]) -> None:
        if time.monotonic() - self._last < LOG_EVERY_SECONDS:
            return
        self._last = time.monotonic()
        p = progress_of(shards)
        log("job.progress", done=p.done, total=p.total, percent=p.percent, rate=p.rate, eta=p.eta)

    def event(self, text: str) -> None:
        log("job.event", message=text)

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)

    def stop(self) -> None:
        pass


class LiveView(View):
    """A rich table of shards, overall progress and the latest events."""

    def __init__(self) -> None:
        super().__init__()
        self.console = Console(stderr=True)
        self.events: deque[str] = deque(maxlen=6)
        self.live: Live | None = None
        self.job = ""
        self.started = time.monotonic()

    def start(self, job: str, shards: list[Shard], workers: int) -> None:
        self.job, self.started = job, time.monotonic()
        self.live = Live(self._render(shards), console=self.console, refresh_per_second=4)
        self.live.start()
        self.event(f"{len(shards)} shards, {workers} workers")

    def update(self, shards: list[Shard]) -> None:
        if self.live:
            self.live.update(self._render(shards))

    def event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")

    def message(self, text: str) -> None:
        self.console.print(text)

    def stop(self) -> None:
        if self.live:
            self.live.stop()

    def _render(self, shards: list[Shard]) -> Group:
        p = progress_of(shards)
        head = Text(f"{self.job}: {p.done}/{p.total} sequences ({p.percent:.1f}%) "
                    f"{p.rate:.1f}/s ETA {p.eta or '—'}", style="bold")
        table = Table(box=None, pad_edge=False)
        for col in ("shard", "state", "attempt", "done", "seq/s", "last failure"):
            table.add_column(col)
        shown = [s for s in shards if s.state != ShardState.succeeded][:MAX_ROWS]
        for s in shown:
            fail = f"{s.last_failure.type}: {s.last_failure.message[:50]}" if s.last_failure else ""
            table.add_row(str(s.index), Text(s.state.value, style=_STYLE[s.state]), str(s.attempt),
                          f"{s.done}/{s.total}", f"{s.rate:.1f}", fail)
        finished = sum(s.state == ShardState.succeeded for s in shards)
        foot = Text(f"{finished}/{len(shards)} shards done", style="green")
        bar = ProgressBar(total=max(p.total, 1), completed=p.done, width=60)
        return Group(head, bar, table, foot, Text("\n".join(self.events), style="dim"))
