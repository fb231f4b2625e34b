"""The operator's storage reads, made in a child process.

A GET through boto3 costs the caller ~2 ms of CPU (signing, the HTTP exchange, parsing), all
of it holding the GIL. At the default budget (100 reads a second) that is a fifth of a core
inside the operator, fought over with the event loop: its /healthz, its watches and every
job's loop wait behind it. So the reads run in a child process of their own (``python -m
embedjob.operator.read_process``): it holds the :class:`~embedjob.operator.storage_access.
Stores` (the job-scoped identities, Secrets included, never sent back) and a pool of reader
threads. The operator's side, :class:`ReadProcess`, has the same reads and ``forget`` as
``Stores``: a reader thread sends ``(op, id, uid, where, key)`` and waits, without the GIL,
for ``(id, outcome, value)``.

The pipe carries pickles between this process and its own child only (the standard
library's ``multiprocessing.connection``). A child that dies fails the reads in flight with
one logged line, and the next read starts a new one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from embedjob.failures import StorageError
from embedjob.operator.config import OperatorSettings
from embedjob.operator.storage_access import JobStorage, StorageRefused, Stores
from embedjob.store import ObjectNotFound

log = logging.getLogger("embedjob.operator.reads")

THREADS = 8
"""Reads in flight at once in the child (S3 GETs take 10-50 ms: 8 carry 160+ a second)."""
ANSWER_SECONDS = 120.0
"""Longest wait for one answer: past the store's own timeouts and retries."""

Answer = tuple[str, Any]
"""("ok", what the op returns) | ("missing", None) | ("error", message)
| ("refused", (message, lasting))."""


class ReadProcess:
    """The operator's side: ``read`` blocks the calling thread (never the event loop's)."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self._ids = itertools.count()
        self._waiting: dict[int, Future[Answer]] = {}
        self._lock = threading.Lock()
        self._child: tuple[subprocess.Popen[bytes], Connection, Connection] | None = None
        self.started = 0
        """Children started so far (one, unless one died)."""

    @property
    def pid(self) -> int | None:
        """The running child's process id, if one runs."""
        child = self._child
        return child[0].pid if child is not None else None

    def start(self) -> ReadProcess:
        with self._lock:
            self._ensure_child()
        return self

    def read(self, uid: str, where: JobStorage, key: str) -> bytes:
        """One object of the job's output (ObjectNotFound, StorageError, StorageRefused)."""
        return bytes(self._ask("read", uid, where, key))

    def read_tagged(self, uid: str, where: JobStorage, key: str) -> tuple[bytes, str]:
        data, tag = self._ask("read_tagged", uid, where, key)
        return bytes(data), str(tag)

    def listing(self, uid: str, where: JobStorage, prefix: str) -> dict[str, str]:
        return dict(self._ask("listing", uid, where, prefix))

    def _ask(self, op: str, uid: str, where: JobStorage, key: str) -> Any:
        """Send one request to the child and wait for its answer."""
        future: Future[Answer] = Future()
        with self._lock:
            ident = next(self._ids)
            self._waiting[ident] = future
            try:
                self._ensure_child()[2].send((op, ident, uid, where, key))
            except OSError as err:
                self._waiting.pop(ident, None)
                raise StorageError(f"the operator's storage reader process is gone ({err}); "
                                   "it is started again for the next read") from None
        try:
            outcome, value = future.result(timeout=ANSWER_SECONDS)
        except concurrent.futures.TimeoutError:  # the builtin one only from Python 3.11
            with self._lock:
                self._waiting.pop(ident, None)
            raise StorageError(f"no answer from the operator's storage reader process in "
                               f"{ANSWER_SECONDS:.0f} s") from None
        return _unwrap(outcome, value)

    def forget(self, uid: str) -> None:
        with self._lock:
            if self._child is not None:
                with contextlib.suppress(OSError):  # a dead child forgot everything already
                    self._child[2].send(("forget", uid))

    def stop(self) -> None:
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child[2].close()  # the child's recv ends: it exits
            child[0].wait(timeout=10)

    def _ensure_child(self) -> tuple[subprocess.Popen[bytes], Connection, Connection]:
        """The running child, started if there is none (called holding the lock)."""
        if self._child is not None and self._child[0].poll() is None:
            return self._child
        proc = subprocess.Popen([sys.executable, "-m", "embedjob.operator.read_process"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        answers = Connection(os.dup(proc.stdout.fileno()), writable=False)
        asks = Connection(os.dup(proc.stdin.fileno()), readable=False)
        proc.stdin.close()
        proc.stdout.close()
        asks.send(self.settings)
        self._child = (proc, answers, asks)
        self.started += 1
        threading.Thread(target=self._receive, args=(proc, answers), daemon=True,
                         name="embedjob-read-answers").start()
        return self._child

    def _receive(self, proc: subprocess.Popen[bytes], answers: Connection) -> None:
        """Hand each answer to its waiting reader, until the child's pipe closes."""
        while True:
            try:
                ident, outcome, value = answers.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._waiting.pop(ident, None)
            if future is not None:
                future.set_result((outcome, value))
        answers.close()
        code = proc.wait()
        with self._lock:
            stopped = self._child is None or self._child[0] is not proc
            if not stopped:
                self._child = None
            waiting, self._waiting = self._waiting, {}
        if not stopped:
            log.warning("the storage reader process exited (code %s); %d read(s) in flight "
                        "failed; the next read starts a new one", code, len(waiting))
        for future in waiting.values():
            future.set_result(("error", f"the operator's storage reader process exited "
                                        f"(code {code})"))


def _unwrap(outcome: str, value: Any) -> Any:
    if outcome == "ok":
        return value
    if outcome == "missing":
        raise ObjectNotFound(str(value or "no such object"))
    if outcome == "refused":
        message, lasting = value
        refused = StorageRefused(message)
        refused.lasting = lasting
        raise refused
    raise StorageError(str(value))


# --- the child -------------------------------------------------------------------------------


def answer(stores: Stores, op: str, uid: str, where: JobStorage, key: str) -> Answer:
    """One request in the child (``op``: a method of :class:`Stores` that reads), as an
    answer: every failure becomes one line."""
    ask = {"read": stores.read, "read_tagged": stores.read_tagged,
           "listing": stores.listing}[op]
    try:
        return "ok", ask(uid, where, key)
    except StorageRefused as err:
        return "refused", (err.message, err.lasting)
    except ObjectNotFound as err:
        return "missing", err.message
    except StorageError as err:
        return "error", err.message
    except Exception as err:  # unexpected: the operator logs it as storage trouble
        return "error", f"{type(err).__name__}: {err}"


def serve(asks: Connection, answers: Connection) -> None:
    """The child's loop: settings first, then reads and forgets until the operator closes
    the pipe (or exits)."""
    from embedjob.operator import kube  # the child reads Secrets with the operator's account

    settings: OperatorSettings = asks.recv()
    stores = Stores(settings, kube.read_secret_data)
    send = threading.Lock()

    def reply(op: str, ident: int, uid: str, where: JobStorage, key: str) -> None:
        result = answer(stores, op, uid, where, key)
        with send:
            answers.send((ident, *result))

    with ThreadPoolExecutor(THREADS, thread_name_prefix="embedjob-read") as pool:
        while True:
            try:
                message = asks.recv()
            except (EOFError, OSError):
                return
            if message[0] == "forget":
                stores.forget(message[1])
            else:
                pool.submit(reply, *message)


def main() -> None:
    # The pipes are stdin/stdout; anything printed by accident goes to stderr instead.
    asks = Connection(os.dup(0), writable=False)
    answers = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C of a local operator
        serve(asks, answers)


if __name__ == "__main__":
    main()
