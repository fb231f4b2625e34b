"""The operator's pod informer: a server-side filtered, paginated list, then a watch.

Hand-rolled because kopf cannot do this: for ``@kopf.index("pods", labels=...)`` kopf sends
no labelSelector (it filters client-side) and lists without ``limit``, so every pod in scope,
ours or not, arrives in one response and is parsed by the operator. This informer asks the
API server for our pods only (``labelSelector=embedjob.io/job-uid``), in pages of
:data:`PAGE_SIZE`, then watches from the list's resourceVersion with bookmarks; a 410 Gone
(the resourceVersion expired) starts a fresh list. It keeps only
:class:`~embedjob.operator.views.PodView` per pod, by job uid.

The list and the watch, and the parsing, run in a child process
(:mod:`embedjob.operator.pod_watch`): parsing in a thread of the operator held the GIL the
event loop waits for. A thread here receives what the child sends, a few hundred pods per
message, and hands it to the loop in one callback per burst (:class:`LoopQueue`), not one
per event: 10^4 pods starting at once are ~3 x 10^4 watch events. The store itself is
changed only on the event loop, so readers on the loop need no locks. A child that exits
is replaced (with backoff); the new one lists afresh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Generic, TypeVar

from kubernetes import client, config

from embedjob.operator import kube, rest
from embedjob.operator.pod_wire import (
    ApiAccess,
    Change,
    Expiry,
    Key,
    Sent,
    Token,
    WatchPlan,
)
from embedjob.operator.views import PodView

log = logging.getLogger("embedjob.operator.informer")

PAGE_SIZE = 500
"""Pods per list request: one page is parsed at a time, however many pods a scope has."""
WATCH_SECONDS = 300
"""The server ends each watch after this long (then it resumes from the last version)."""
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Pauses before a new child after consecutive exits (the last one repeats)."""
TOKEN_CHECK_SECONDS = 30.0
"""How often the child's token is compared with the configuration's (EKS tokens last 15
minutes, in-cluster ones are refreshed a minute before they expire)."""


class PodStore:
    """Pod views by job uid, changed by watch events and completed lists. Pure data."""

    def __init__(self) -> None:
        self.by_job: dict[str, dict[Key, PodView]] = {}
        self.uid_of: dict[Key, str] = {}

    def apply(self, changes: Iterable[Change], listed: set[Key] | None = None,
              scope: str | None = None) -> set[str]:
        """Apply changes; ``listed``: the keys a completed list of ``scope`` saw (the
        scope's other pods were deleted while nobody watched). Returns the uids of jobs
        whose pods changed."""
        woken: set[str] = set()
        for change in changes:
            woken |= self._put(change)
        if listed is not None:
            gone = [k for k in self.uid_of if _in_scope(k, scope) and k not in listed]
            for key in gone:
                woken |= self._put(Change(key, self.uid_of[key], None))
        return woken

    def _put(self, change: Change) -> set[str]:
        old_uid = self.uid_of.pop(change.key, None)
        old = self.by_job.get(old_uid, {}).pop(change.key, None) if old_uid else None
        if old_uid and not self.by_job.get(old_uid):
            self.by_job.pop(old_uid, None)
        if change.view is not None:
            self.uid_of[change.key] = change.uid
            self.by_job.setdefault(change.uid, {})[change.key] = change.view
        if old == change.view and (old is None or old_uid == change.uid):
            return set()  # nothing a reconcile reads changed (e.g. only resourceVersion)
        return {u for u in (old_uid, change.uid) if u}


T = TypeVar("T")


class LoopQueue(Generic[T]):
    """Items put by threads, handed to ``consume`` on the event loop in batches: one loop
    wake-up per burst (the first item of an empty queue schedules it), not one per item."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 consume: Callable[[list[T]], None]) -> None:
        self.loop, self.consume = loop, consume
        self._items: list[T] = []
        self._lock = threading.Lock()
        self.drains = 0
        """Batches handed over so far."""

    def put(self, item: T) -> None:
        with self._lock:
            first = not self._items
            self._items.append(item)
        if first:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        self.drains += 1
        self.consume(items)


class PodInformer:
    """Our pods by job uid, kept current by one list+watch per scope, in a child process
    (:mod:`embedjob.operator.pod_watch`).

    ``namespaces`` empty: cluster-wide. ``on_change`` gets the uids of jobs whose pods
    changed (on the event loop). Call :meth:`start` on the running loop, :meth:`stop` at
    the end; :meth:`synced` waits until every scope has completed its first list.
    ``kubeconfig``: the child's KUBECONFIG (else it connects as the operator does).
    """

    def __init__(self, namespaces: Iterable[str], on_change: Callable[[set[str]], None],
                 page_size: int = PAGE_SIZE, watch_seconds: int = WATCH_SECONDS,
                 kubeconfig: str | None = None) -> None:
        self.scopes: list[str | None] = list(namespaces) or [None]
        self.on_change, self.page_size, self.watch_seconds = on_change, page_size, watch_seconds
        self.kubeconfig = kubeconfig
        self.store = PodStore()
        self._listed: set[str | None] = set()
        self._synced = asyncio.Event()
        self._stop = threading.Event()
        self._child: tuple[subprocess.Popen[bytes], Connection] | None = None
        self._conf: client.Configuration | None = None
        self._queue: LoopQueue[Sent] | None = None
        self.started = 0
        """Child processes started (one, unless one died)."""
        self.pages = 0
        """List responses received (a list of n pods takes n / page_size of them)."""
        self.lists = 0
        """Completed lists, all scopes: one each at the start, one more per expiry."""
        self.expired = 0
        """Watches (or list pages) refused with 410 Gone, each followed by a new list."""

    # --- on the event loop ------------------------------------------------------------

    def get(self, uid: str) -> tuple[PodView, ...]:
        """The job's pods as last seen (empty before the first list)."""
        return tuple(self.store.by_job.get(uid, {}).values())

    def start(self, resume_from: str | None = None) -> None:
        """Start the child; ``resume_from``: watch from that resourceVersion before any
        list (where an earlier watch stopped), else list first."""
        self._queue = LoopQueue(asyncio.get_running_loop(), self._apply)
        self._conf = (config.new_client_from_config(self.kubeconfig) if self.kubeconfig
                      else kube.connect()).configuration
        threading.Thread(target=self._supervise, args=(resume_from,), daemon=True,
                         name="embedjob-pods").start()

    async def synced(self) -> None:
        await self._synced.wait()

    def stop(self) -> None:
        """Stop the child (closing its pipe ends it; a stuck one is killed)."""
        self._stop.set()
        if self._child is None:
            return
        child, asks = self._child
        asks.close()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()

    def _apply(self, items: list[Sent]) -> None:
        """Apply what the child read (on the event loop); wake the jobs whose pods
        changed, each once per call however many of its pods did."""
        woken: set[str] = set()
        for item in items:
            if isinstance(item, Expiry):
                self.expired += 1
                continue
            woken |= self.store.apply(item.changes, item.listed, item.scope)
            self.pages += item.page
            if item.listed is not None:
                self.lists += 1
                self._listed.add(item.scope)
                if len(self._listed) == len(self.scopes):
                    self._synced.set()
        if woken:
            self.on_change(woken)

    # --- in the supervising thread ----------------------------------------------------

    def _supervise(self, resume_from: str | None) -> None:
        """Run the child, and a new one (listing afresh) whenever one exits."""
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ended = f"exited (code {self._run_child(resume_from)})"
            except OSError as err:  # it could not start (no executable, no memory)
                ended = f"could not start ({err})"
            resume_from = None
            if self._stop.is_set():
                return
            failures = 0 if time.monotonic() - started > BACKOFF_SECONDS[-1] else failures + 1
            pause = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
            log.warning("the pod watch process %s; starting a new one in %.0f s", ended, pause)
            self._stop.wait(pause)

    def _run_child(self, resume_from: str | None) -> int | None:
        """One child: send it the plan and the token (again when it changes), hand what
        it sends to the loop until it ends."""
        child = subprocess.Popen([sys.executable, "-m", "embedjob.operator.pod_watch"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None and self._queue
        received = Connection(os.dup(child.stdout.fileno()), writable=False)
        asks = Connection(os.dup(child.stdin.fileno()), readable=False)
        child.stdout.close()
        child.stdin.close()
        self._child, self.started = (child, asks), self.started + 1
        if self._stop.is_set():  # stopped while this child started: end it at once
            asks.close()
        ended, conf = threading.Event(), self._conf
        assert conf is not None  # start() set it
        try:
            asks.send(WatchPlan(self.scopes, self.page_size, self.watch_seconds, resume_from,
                                access_of(conf)))
            asks.send(Token(rest.bearer(conf)))
            threading.Thread(target=send_tokens, args=(conf, asks, ended), daemon=True,
                             name="embedjob-pods-token").start()
            while True:
                for item in received.recv():
                    if not self._stop.is_set():
                        self._queue.put(item)
        except (EOFError, OSError, pickle.UnpicklingError) as err:
            if not isinstance(err, EOFError):
                log.warning("reading the pod watch process failed: %s", err)
        finally:
            ended.set()
            received.close()
            asks.close()
            if child.poll() is None:  # a broken pipe, not an exit: end it
                child.kill()
        return child.wait()


def send_tokens(conf: client.Configuration, asks: Connection, ended: threading.Event,
                every: float = TOKEN_CHECK_SECONDS) -> None:
    """The token as the client configuration has it now (in-cluster tokens rotate, exec
    plugins' expire), sent to the child when it changed, until the child ends."""
    sent = rest.bearer(conf)
    while not ended.wait(every):
        token = rest.bearer(conf)
        if token != sent:
            try:
                asks.send(Token(token))
            except OSError:  # the child ended: its successor gets the token first
                return
            sent = token


def access_of(conf: client.Configuration) -> ApiAccess:
    """What the child needs of the client configuration to reach the API server."""
    return ApiAccess(
        host=conf.host, ca_file=conf.ssl_ca_cert, cert_file=conf.cert_file,
        key_file=conf.key_file, verify=bool(conf.verify_ssl),
        server_name=conf.tls_server_name or None, proxy=conf.proxy or None,
        connect_timeout=kube.CONNECT_TIMEOUT_SECONDS, read_timeout=kube.READ_TIMEOUT_SECONDS)


def _in_scope(key: Key, scope: str | None) -> bool:
    return scope is None or key[0] == scope


