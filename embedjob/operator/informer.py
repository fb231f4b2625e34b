"""The operator's pod informer: a server-side filtered, paginated list, then a watch.

Hand-rolled because kopf cannot do this: for ``@kopf.index("pods", labels=...)`` kopf sends
no labelSelector (it filters client-side) and lists without ``limit``, so every pod in scope,
ours or not, arrives in one response and is parsed by the operator. This informer asks the
API server for our pods only (``labelSelector=embedjob.io/job-uid``), in pages of
:data:`PAGE_SIZE`, then watches from the list's resourceVersion with bookmarks; a 410 Gone
(the resourceVersion expired) starts a fresh list, any other error a logged reconnect with
backoff. It keeps only :class:`~embedjob.operator.views.PodView` per pod, by job uid.

The official client is synchronous: each scope (the whole cluster, or one namespace) runs
in its own daemon thread, which also parses the pods; the store itself is changed only on
the event loop, so readers on the loop need no locks. What the threads parse is queued and
handed to the loop in one callback per batch, not one per event: 10^4 pods starting at once
are ~3 x 10^4 watch events, and a loop wake-up each would cost the loop more than the events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from embedjob.operator import kube
from embedjob.operator.names import LABEL_JOB_UID
from embedjob.operator.views import PodView, pod_view

log = logging.getLogger("embedjob.operator.informer")

PAGE_SIZE = 500
"""Pods per list request: one page is parsed at a time, however many pods a scope has."""
WATCH_SECONDS = 300
"""The server ends each watch after this long (then it resumes from the last version)."""
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Pauses between reconnects after consecutive errors (the last one repeats)."""

Key = tuple[str, str]
"""(namespace, pod name)."""


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): only a new list can resume."""


@dataclass(frozen=True)
class Change:
    """One pod as the watch shows it now; ``view`` None: deleted (or no longer ours)."""

    key: Key
    uid: str
    view: PodView | None


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


Batch = tuple[str | None, list[Change], set[Key] | None]
"""(scope, changes, the keys of a completed list or None): one page, or one watch event."""
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
    """Our pods by job uid, kept current by one list+watch per scope.

    ``namespaces`` empty: cluster-wide. ``on_change`` gets the uids of jobs whose pods
    changed (on the event loop). Call :meth:`start` on the running loop, :meth:`stop` at
    the end; :meth:`synced` waits until every scope has completed its first list.
    """

    def __init__(self, namespaces: Iterable[str], on_change: Callable[[set[str]], None],
                 page_size: int = PAGE_SIZE, watch_seconds: int = WATCH_SECONDS,
                 api: client.ApiClient | None = None) -> None:
        self.api = api
        self.scopes: list[str | None] = list(namespaces) or [None]
        self.on_change, self.page_size, self.watch_seconds = on_change, page_size, watch_seconds
        self.store = PodStore()
        self._listed: set[str | None] = set()
        self._synced = asyncio.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams: set[Any] = set()
        self._queue: LoopQueue[Batch] | None = None
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
        """One thread per scope; ``resume_from``: watch from that resourceVersion before
        any list (where an earlier watch stopped), else list first."""
        self._queue = LoopQueue(asyncio.get_running_loop(), self._apply)
        for scope in self.scopes:
            thread = threading.Thread(target=self._run, args=(scope, resume_from), daemon=True,
                                      name=f"embedjob-pods-{scope or 'all'}")
            thread.start()
            self._threads.append(thread)

    async def synced(self) -> None:
        await self._synced.wait()

    def stop(self) -> None:
        """Stop every scope (an open watch is closed, so its thread ends at once)."""
        self._stop.set()
        for stream in list(self._streams):
            _close(stream)

    def _apply(self, batches: list[Batch]) -> None:
        """Apply what the threads parsed (on the event loop); wake the jobs whose pods
        changed, each once per call however many of its pods did."""
        woken: set[str] = set()
        for scope, changes, listed in batches:
            woken |= self.store.apply(changes, listed, scope)
            if listed is not None:
                self.lists += 1
                self._listed.add(scope)
                if len(self._listed) == len(self.scopes):
                    self._synced.set()
        if woken:
            self.on_change(woken)

    def _send(self, scope: str | None, changes: list[Change], listed: set[Key] | None) -> None:
        assert self._queue is not None
        if not self._stop.is_set():
            self._queue.put((scope, changes, listed))

    # --- in the scope's thread --------------------------------------------------------

    def _run(self, scope: str | None, resource_version: str | None) -> None:
        """List (unless resuming from ``resource_version``), then watch from the list's
        version, until stopped."""
        where = f"namespace {scope}" if scope else "all namespaces"
        failures = 0
        version = resource_version
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list(scope)
                version = self._watch(scope, version)
                failures = 0
            except Expired as err:
                self.expired += 1
                log.info("pod watch in %s expired (%s); listing again", where, err)
                version = None
            except Exception as err:  # any failure: say so, pause, reconnect (never die)
                if self._stop.is_set():
                    return
                pause = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                failures += 1
                log.warning("pod list/watch in %s failed: %s; reconnecting in %.0f s",
                            where, _describe(err), pause)
                self._stop.wait(pause)

    def _list(self, scope: str | None) -> str:
        """Every page of our pods in the scope; returns the list's resourceVersion."""
        listed: set[Key] = set()
        token: str | None = None
        while True:
            page = self._request(scope, limit=self.page_size, _continue=token)
            data = json.loads(page.data)
            self.pages += 1
            changes = [c for c in map(_change, data.get("items") or []) if c is not None]
            listed |= {c.key for c in changes}
            meta = data.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                self._send(scope, changes, listed)
                return str(meta.get("resourceVersion") or "")
            self._send(scope, changes, None)

    def _watch(self, scope: str | None, version: str) -> str:
        """One watch until the server ends it; returns the last version seen."""
        stream = self._request(scope, watch=True, resource_version=version,
                               allow_watch_bookmarks=True, timeout_seconds=self.watch_seconds)
        self._streams.add(stream)
        try:
            for event in _events(stream):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired(obj.get("message") or "410 Gone")
                    raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                change = _change(obj)
                if change is not None:
                    if kind == "DELETED":
                        change = Change(change.key, change.uid, None)
                    self._send(scope, [change], None)
        finally:
            self._streams.discard(stream)
            _close(stream)
        return version

    def _request(self, scope: str | None, **kwargs: Any) -> Any:
        """A raw response (no model objects: we parse only what PodView needs)."""
        api = client.CoreV1Api(self.api or kube.connect())
        timeout = (kube.CONNECT_TIMEOUT_SECONDS,
                   self.watch_seconds + 30 if kwargs.get("watch") else kube.READ_TIMEOUT_SECONDS)
        args = {k: v for k, v in kwargs.items() if v is not None}
        args |= {"label_selector": LABEL_JOB_UID, "_preload_content": False,
                 "_request_timeout": timeout}
        try:
            if scope is None:
                return api.list_pod_for_all_namespaces(**args)
            return api.list_namespaced_pod(scope, **args)
        except ApiException as err:
            if err.status == 410:
                raise Expired(kube.describe(err)) from None
            raise


def _change(body: dict[str, Any]) -> Change | None:
    meta = body.get("metadata") or {}
    uid = (meta.get("labels") or {}).get(LABEL_JOB_UID)
    key = (meta.get("namespace") or "", meta.get("name") or "")
    if not uid or not key[1]:
        return None
    return Change(key, uid, pod_view(body))


def _events(stream: Any) -> Iterator[dict[str, Any]]:
    for line in iter_resp_lines(stream):
        if line:
            yield json.loads(line)


def _in_scope(key: Key, scope: str | None) -> bool:
    return scope is None or key[0] == scope


def _close(stream: Any) -> None:
    try:
        stream.shutdown() if hasattr(stream, "shutdown") else None
        stream.release_conn()
    except Exception as err:  # closing a dead connection: nothing left to do
        log.debug("closing a pod watch: %s", err)


def _describe(err: Exception) -> str:
    if isinstance(err, ApiException):
        return kube.describe(err)
    if isinstance(err, urllib3.exceptions.HTTPError):
        return str(kube.unreachable("pods", err))
    return f"{type(err).__name__}: {err}"
