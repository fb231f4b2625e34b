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

from embedjob import layout
from embedjob.local.patience import duration
from embedjob.local.scheduler import Shard, progress_of
from embedjob.logs import log
from embedjob.spec import ShardState
from embedjob.summary import IndexSummary

LOG_EVERY_SECONDS = 10.0
MAX_ROWS = 20

_STYLE = {
    ShardState.succeeded: "green",
    ShardState.failed: "red",
    ShardState.backoff: "yellow",
    ShardState.running: "cyan",
    ShardState.pending: "dim",
}


def plural(count: int, noun: str) -> str:
    """'1 sequence', '2 sequences'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def index_notes(summary: IndexSummary, uri: str) -> list[str]:
    """What the index decided that the spec did not say: fewer shards, truncation."""
    notes = []
    if summary.requested_shards > summary.shards:
        notes.append(f"shards: {summary.requested_shards} requested, but the input has "
                     f"{plural(summary.sequences, 'sequence')}: running "
                     f"{plural(summary.shards, 'shard')}")
    if summary.truncated:
        notes.append(f"{plural(summary.truncated, 'sequence')} longer than model.maxResidues "
                     f"({summary.max_residues}) will be embedded truncated (ids in "
                     f"{uri}{layout.TRUNCATED}; longSequences: window embeds them whole)")
    return notes


class Counter:
    """Sequences embedded this run: committed and in flight apart, a rate from the first
    batch on (the workers' own rates while they run, the run's average once they stop)."""

    def __init__(self) -> None:
        self.start_done: int | None = None
        self.first_move: float | None = None

    def figures(self, shards: list[Shard]) -> dict[str, object]:
        p = progress_of(shards)
        in_flight = sum(s.in_flight for s in shards if s.state == ShardState.running)
        if self.start_done is None:  # shards finished before this run
            self.start_done = sum(s.total for s in shards if s.state == ShardState.succeeded)
        resumed = self.start_done + sum(s.resumed_at for s in shards)
        embedded = p.done + in_flight - resumed
        now = time.monotonic()
        if embedded > 0 and self.first_move is None:
            self.first_move = now
        rate = p.rate
        if rate <= 0 and self.first_move is not None and now > self.first_move:
            rate = embedded / (now - self.first_move)
        return {"done": p.done, "inFlight": in_flight, "total": p.total,
                "percent": p.percent, "rate": round(rate, 2),
                "eta": duration(max(0, p.total - p.done - in_flight) / rate) if rate > 0 else None,
                "resumedAt": resumed}

    @staticmethod
    def line(f: dict[str, object]) -> str:
        text = (f"{f['done']} committed + {f['inFlight']} in flight of "
                f"{plural(int(str(f['total'])), 'sequence')} ({f['percent']:.1f}%) · "
                f"{f['rate']:.1f}/s · ETA {f['eta'] or '—'}")
        return text + (f" · resumed at {f['resumedAt']}" if f["resumedAt"] else "")


class View:
    """Plain view: one JSON line per event and a progress line every few seconds."""

    def __init__(self) -> None:
        self._last = 0.0
        self.counter = Counter()

    @staticmethod
    def for_terminal() -> View:
        return LiveView() if sys.stderr.isatty() else View()

    def start(self, job: str, shards: list[Shard], workers: int) -> None:
        self.counter.figures(shards)
        log("job.start", job=job, shards=len(shards), workers=workers)

    def update(self, shards: list[Shard]) -> None:
        figures = self.counter.figures(shards)
        if time.monotonic() - self._last < LOG_EVERY_SECONDS:
            return
        self._last = time.monotonic()
        log("job.progress", **figures)

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

    def start(self, job: str, shards: list[Shard], workers: int) -> None:
        self.job = job
        self.event(f"{plural(len(shards), 'shard')}, {plural(workers, 'worker')}")
        self.live = Live(self._render(shards), console=self.console, refresh_per_second=4)
        self.live.start()

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
            self.live = None

    def _render(self, shards: list[Shard]) -> Group:
        f = self.counter.figures(shards)
        head = Text(f"{self.job}: {Counter.line(f)}", style="bold")
        finished = sum(s.state == ShardState.succeeded for s in shards)
        # The bar gets a line of its own: rendered bare it runs into the table header.
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=max(int(str(f["total"])), 1), completed=int(str(f["done"])),
                                width=60),
                    Text(f"{finished}/{len(shards)} shards done", style="green"))
        table = Table(box=None, pad_edge=False)
        for col in ("shard", "state", "attempt", "committed", "in flight", "seq/s", "stage",
                    "last failure"):
            table.add_column(col)
        for s in [s for s in shards if s.state != ShardState.succeeded][:MAX_ROWS]:
            fail = f"{s.last_failure.type}: {s.last_failure.message[:50]}" if s.last_failure else ""
            running = s.state == ShardState.running
            table.add_row(str(s.index), Text(s.state.value, style=_STYLE[s.state]), str(s.attempt),
                          f"{s.done}/{s.total}", str(s.in_flight) if running else "",
                          f"{s.rate:.1f}" if running else "", s.stage if running else "", fail)
        return Group(head, bar, table, Text("\n".join(self.events), style="dim"))
