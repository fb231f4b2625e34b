"""The pod informer's list+watch, in a child process of the operator.

Parsing watch events is CPU work that holds the GIL: in the operator's process a thread doing
it starved the event loop (a loop that gives the GIL up on every socket call waits a switch
interval to win it back, and with two such threads it may wait many; docs/operator.md, "The
event loop and the GIL"). So the list and the watch run here, ``python -m
embedjob.operator.pod_watch``, one thread per scope, and only the reduced pods
(:class:`~embedjob.operator.informer.Change`) cross the pipe, a few hundred per message.

Per scope: a list in pages of ``page_size``, asking the server for our pods only
(``labelSelector=embedjob.io/job-uid``), then a watch from the list's resourceVersion with
bookmarks; a 410 Gone starts a fresh list, any other error a logged reconnect with backoff.
The child exits when the operator closes its pipe (or exits itself).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from embedjob.operator import kube, logs
from embedjob.operator.informer import Batch, Change, Expiry, Key, Sent, WatchPlan
from embedjob.operator.names import LABEL_JOB_UID
from embedjob.operator.views import pod_view

log = logging.getLogger("embedjob.operator.informer")

BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Pauses between reconnects after consecutive errors (the last one repeats)."""
CHANGES_PER_MESSAGE = 200
"""At most this many pods per message: the operator unpickles one message holding the GIL."""


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): only a new list can resume."""


class ScopeWatch:
    """List, then watch, one scope (a namespace, or None: all) until ``stop`` is set;
    everything read goes to ``send``."""

    def __init__(self, scope: str | None, plan: WatchPlan, send: queue.SimpleQueue[Sent],
                 stop: threading.Event) -> None:
        self.scope, self.plan, self.send, self.stop = scope, plan, send, stop
        self.where = f"namespace {scope}" if scope else "all namespaces"
        self._stream: Any = None

    def run(self, version: str | None) -> None:
        """List (unless resuming from ``version``), then watch from the list's version."""
        failures = 0
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self.list()
                version = self.watch(version)
                failures = 0
            except Expired as err:
                log.info("pod watch in %s expired (%s); listing again", self.where, err)
                self.send.put(Expiry(self.scope))
                version = None
            except Exception as err:  # any failure: say so, pause, reconnect (never die)
                pause = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                failures += 1
                log.warning("pod list/watch in %s failed: %s; reconnecting in %.0f s",
                            self.where, _describe(err), pause)
                self.stop.wait(pause)

    def list(self) -> str:
        """Every page of our pods in the scope; returns the list's resourceVersion."""
        listed: set[Key] = set()
        token: str | None = None
        while True:
            page = self.request(limit=self.plan.page_size, _continue=token)
            data = json.loads(page.data)
            changes = [c for c in map(change_of, data.get("items") or []) if c is not None]
            listed |= {c.key for c in changes}
            meta = data.get("metadata") or {}
            token = meta.get("continue")
            self.send.put(Batch(self.scope, changes, None if token else listed, page=True))
            if not token:
                return str(meta.get("resourceVersion") or "")

    def watch(self, version: str) -> str:
        """One watch until the server ends it; returns the last version seen."""
        stream = self.request(watch=True, resource_version=version,
                              allow_watch_bookmarks=True, timeout_seconds=self.plan.watch_seconds)
        try:
            for event in _events(stream):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired(obj.get("message") or "410 Gone")
                    raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                change = change_of(obj) if kind != "BOOKMARK" else None
                if change is not None:
                    if kind == "DELETED":
                        change = Change(change.key, change.uid, None)
                    self.send.put(Batch(self.scope, [change], None))
        finally:
            _close(stream)
        return version

    def request(self, **kwargs: Any) -> Any:
        """A raw response (no model objects: we parse only what PodView needs)."""
        api = client.CoreV1Api(kube.connect())
        watching = kwargs.get("watch")
        timeout = (kube.CONNECT_TIMEOUT_SECONDS,
                   self.plan.watch_seconds + 30 if watching else kube.READ_TIMEOUT_SECONDS)
        args = {k: v for k, v in kwargs.items() if v is not None}
        args |= {"label_selector": LABEL_JOB_UID, "_preload_content": False,
                 "_request_timeout": timeout}
        try:
            if self.scope is None:
                return api.list_pod_for_all_namespaces(**args)
            return api.list_namespaced_pod(self.scope, **args)
        except ApiException as err:
            if err.status == 410:
                raise Expired(kube.describe(err)) from None
            raise


def change_of(body: dict[str, Any]) -> Change | None:
    """A pod of ours, reduced; None for a pod without our labels."""
    meta = body.get("metadata") or {}
    uid = (meta.get("labels") or {}).get(LABEL_JOB_UID)
    key = (meta.get("namespace") or "", meta.get("name") or "")
    if not uid or not key[1]:
        return None
    return Change(key, uid, pod_view(body))


def forward(items: queue.SimpleQueue[Sent], out: Connection) -> None:
    """Send what the scopes read, in messages of what has piled up since the last one (at
    most CHANGES_PER_MESSAGE pods): one pipe write per burst, not one per event."""
    while True:
        message = [items.get()]
        size = len(getattr(message[0], "changes", ()))
        with contextlib.suppress(queue.Empty):
            while size < CHANGES_PER_MESSAGE:
                item = items.get_nowait()
                message.append(item)
                size += len(getattr(item, "changes", ()))
        try:
            out.send(message)
        except OSError:  # the operator is gone (the main thread sees it too, and exits)
            return


def serve(asks: Connection, out: Connection) -> None:
    """The child: the watch plan first, then every scope's list+watch, until the operator
    closes the pipe."""
    plan: WatchPlan = asks.recv()
    items: queue.SimpleQueue[Sent] = queue.SimpleQueue()
    stop = threading.Event()
    for scope in plan.scopes:
        watch = ScopeWatch(scope, plan, items, stop)
        threading.Thread(target=watch.run, args=(plan.resume_from,), daemon=True,
                         name=f"embedjob-pods-{scope or 'all'}").start()
    threading.Thread(target=forward, args=(items, out), daemon=True,
                     name="embedjob-pods-send").start()
    with contextlib.suppress(EOFError, OSError):
        asks.recv()  # nothing more comes: this returns when the operator closes the pipe
    stop.set()


def _events(stream: Any) -> Iterator[dict[str, Any]]:
    for line in iter_resp_lines(stream):
        if line:
            yield json.loads(line)


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


def main() -> None:
    # The pipes are stdin/stdout; anything printed by accident goes to stderr instead.
    asks = Connection(os.dup(0), writable=False)
    out = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    logs.json_logs()
    # Ctrl-C of a local operator; an operator that stopped before sending the plan.
    with contextlib.suppress(KeyboardInterrupt, EOFError, OSError):
        serve(asks, out)
    os._exit(0)  # the scope threads may sit in a read: do not wait for them


if __name__ == "__main__":
    main()
