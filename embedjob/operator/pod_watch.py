"""The pod informer's list+watch, in a child process of the operator.

Parsing watch events is CPU work that holds the GIL: in the operator's process a thread doing
it starved the event loop (a loop that gives the GIL up on every socket call waits a switch
interval to win it back, and with two such threads it may wait many; docs/operator.md, "The
event loop and the GIL"). So the list and the watch run here, ``python -m
embedjob.operator.pod_watch``, one thread per scope, and only the reduced pods
(:class:`~embedjob.operator.pod_wire.Change`) cross the pipe, a few hundred per message.

Per scope: a list in pages of ``page_size``, asking the server for our pods only
(``labelSelector=embedjob.io/job-uid``), then a watch from the list's resourceVersion with
bookmarks; a 410 Gone starts a fresh list, any other error a logged reconnect with backoff.
Plain urllib3 with what the operator's client configuration says (:class:`ApiAccess`) and
the token it sends (again when it changes): the Kubernetes client would double this
process's memory. The child exits when the operator closes its pipe (or exits itself).
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
from urllib.parse import quote

import urllib3

from embedjob.operator import logs
from embedjob.operator.names import LABEL_JOB_UID
from embedjob.operator.pod_wire import (
    ApiAccess,
    Batch,
    Change,
    Expiry,
    Key,
    Sent,
    Token,
    WatchPlan,
)
from embedjob.operator.views import pod_view

log = logging.getLogger("embedjob.operator.informer")

BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Pauses between reconnects after consecutive errors (the last one repeats)."""
CHANGES_PER_MESSAGE = 200
"""At most this many pods per message: the operator unpickles one message holding the GIL."""


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): only a new list can resume."""


class ApiError(Exception):
    """An error answer: its status and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status


class Api:
    """GETs of our pods over one connection pool, with the operator's current token."""

    def __init__(self, access: ApiAccess) -> None:
        tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED" if access.verify else "CERT_NONE",
                               "ca_certs": access.ca_file, "cert_file": access.cert_file,
                               "key_file": access.key_file,
                               "server_hostname": access.server_name}
        self.http = (urllib3.ProxyManager(access.proxy, **tls) if access.proxy
                     else urllib3.PoolManager(**tls))
        self.access = access
        self.token: str | None = None

    def pods(self, scope: str | None, read_timeout: float, **query: Any
             ) -> urllib3.BaseHTTPResponse:
        """A streaming answer (read it, then ``release_conn``); ApiError for an error one."""
        path = f"/api/v1/namespaces/{quote(scope, safe='')}/pods" if scope else "/api/v1/pods"
        fields = {"labelSelector": LABEL_JOB_UID} | {
            k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in query.items() if v is not None}
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = self.token
        answer = self.http.request(
            "GET", self.access.host.rstrip("/") + path, fields=fields, headers=headers,
            preload_content=False, retries=False,
            timeout=urllib3.Timeout(connect=self.access.connect_timeout, read=read_timeout))
        if answer.status >= 400:
            body = answer.read()
            answer.release_conn()
            raise ApiError(answer.status, _message(body, answer.reason))
        return answer


class ScopeWatch:
    """List, then watch, one scope (a namespace, or None: all) until ``stop`` is set;
    everything read goes to ``send``."""

    def __init__(self, scope: str | None, plan: WatchPlan, api: Api,
                 send: queue.SimpleQueue[Sent], stop: threading.Event) -> None:
        self.scope, self.plan, self.api, self.send, self.stop = scope, plan, api, send, stop
        self.where = f"namespace {scope}" if scope else "all namespaces"

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
            answer = self.request(self.plan.access.read_timeout, limit=self.plan.page_size,
                                  **{"continue": token})
            try:
                data = json.loads(answer.read())
            finally:
                answer.release_conn()
            changes = [c for c in map(change_of, data.get("items") or []) if c is not None]
            listed |= {c.key for c in changes}
            meta = data.get("metadata") or {}
            token = meta.get("continue")
            self.send.put(Batch(self.scope, changes, None if token else listed, page=True))
            if not token:
                return str(meta.get("resourceVersion") or "")

    def watch(self, version: str) -> str:
        """One watch until the server ends it; returns the last version seen."""
        seconds = self.plan.watch_seconds
        answer = self.request(seconds + 30, watch=True, resourceVersion=version,
                              allowWatchBookmarks=True, timeoutSeconds=seconds)
        try:
            for event in _events(answer):
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
            _close(answer)
        return version

    def request(self, read_timeout: float, **query: Any) -> urllib3.BaseHTTPResponse:
        try:
            return self.api.pods(self.scope, read_timeout, **query)
        except ApiError as err:
            if err.status == 410:
                raise Expired(str(err)) from None
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
        size = _pods_in(message[0])
        with contextlib.suppress(queue.Empty):
            while size < CHANGES_PER_MESSAGE:
                item = items.get_nowait()
                message.append(item)
                size += _pods_in(item)
        try:
            out.send(message)
        except OSError:  # the operator is gone (the main thread sees it too, and exits)
            return


def _pods_in(item: Sent) -> int:
    return len(item.changes) if isinstance(item, Batch) else 0


def serve(asks: Connection, out: Connection) -> None:
    """The child: the watch plan and a token first, then every scope's list+watch; new
    tokens as the operator sends them, until it closes the pipe."""
    plan: WatchPlan = asks.recv()
    api = Api(plan.access)
    api.token = asks.recv().value
    items: queue.SimpleQueue[Sent] = queue.SimpleQueue()
    stop = threading.Event()
    for scope in plan.scopes:
        watch = ScopeWatch(scope, plan, api, items, stop)
        threading.Thread(target=watch.run, args=(plan.resume_from,), daemon=True,
                         name=f"embedjob-pods-{scope or 'all'}").start()
    threading.Thread(target=forward, args=(items, out), daemon=True,
                     name="embedjob-pods-send").start()
    with contextlib.suppress(EOFError, OSError):
        while True:
            token: Token = asks.recv()
            api.token = token.value
    stop.set()


def _events(answer: urllib3.BaseHTTPResponse) -> Iterator[dict[str, Any]]:
    """The watch's events, one JSON object per line, as the chunks arrive."""
    pending = b""
    for chunk in answer.stream(64 * 1024):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (json.loads(line) for line in lines if line.strip())
    if pending.strip():
        yield json.loads(pending)


def _message(body: bytes, reason: str | None) -> str:
    """The server's Status message, else the HTTP reason."""
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(body).get("message") or reason)
    return str(reason or "")


def _close(answer: urllib3.BaseHTTPResponse) -> None:
    try:
        answer.shutdown() if hasattr(answer, "shutdown") else None
        answer.release_conn()
    except Exception as err:  # closing a dead connection: nothing left to do
        log.debug("closing a pod watch: %s", err)


def _describe(err: Exception) -> str:
    """One line: the innermost reason, without a connection's repr (as the operator's own
    calls say it, ``rest.unreachable``, which this process does not import: aiohttp)."""
    if isinstance(err, urllib3.exceptions.HTTPError):
        reason = getattr(err, "reason", None)
        cause = reason if isinstance(reason, BaseException) else err
        text = str(cause).split(": ", 1)[-1] or "no answer in time"
        return f"Kubernetes API unreachable (pods): {type(cause).__name__}: {text}"
    if isinstance(err, ApiError):  # the server's own words: "403 pods is forbidden: …"
        return str(err)
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
