"""A fault-injecting HTTP proxy between boto3 and moto's S3 server, on loopback.

Clients use the proxy's URL as their S3 endpoint; every request is forwarded to the real
server unless a fault is chosen for it. Faults, per request:

- ``503`` / ``500``: answered with an S3 error (SlowDown / InternalError), not forwarded;
  ``403`` (AccessDenied) likewise, but only when forced (never drawn at random);
- ``delay``: held ``delay`` seconds (a random value in the range), then forwarded;
- ``drop``: forwarded, the server acts, its response is read — and the client's connection is
  closed without an answer (a lost response to a request that succeeded);
- ``cut``: GET of an object only: the status, the headers and half of the body are sent, then
  the connection is closed (IncompleteRead in the middle of a streamed body).

Random faults hit ``rate`` of the requests, drawn from a seeded RNG; :meth:`FaultProxy.force`
queues deterministic faults for the next matching requests. ``counts`` says what was injected;
``signed`` records who signed each request (the SigV4 access key id, the method, the path), so a
test can see which identity a client used.
:meth:`FaultProxy.outage` takes the store away until :meth:`FaultProxy.end_outage`: every
request gets ``503``/``500``, or ``reset`` (the connection is closed before anything is
forwarded or answered, as when the endpoint is down).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("503", "500", "delay", "drop", "cut")
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
        "expect"}  # fmt: skip
_ERRORS = {"503": (503, "SlowDown"), "500": (500, "InternalError"), "403": (403, "AccessDenied")}


@dataclass
class _Forced:
    kind: str
    remaining: int
    method: str | None
    contains: str | None
    header: str | None = None


@dataclass
class FaultProxy:
    upstream: str  # http://host:port of the real S3 server
    rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    delay: tuple[float, float] = (0.2, 2.0)  # seconds; short in tests, configurable
    counts: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, fault)
    signed: list[tuple[str, str, str]] = field(default_factory=list)  # (key id, method, path)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._forced: list[_Forced] = []
        self._outage: str | None = None
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="faultproxy")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def force(self, kind: str, times: int = 1, method: str | None = None,
              contains: str | None = None, header: str | None = None) -> None:
        """The next ``times`` requests with ``method`` whose path (query included) contains
        ``contains`` and whose headers contain ``header`` (e.g. one client's access key in
        its signature: ``Credential=KEY/``) get ``kind``."""
        assert kind in KINDS or kind in _ERRORS, kind
        with self._lock:
            self._forced.append(_Forced(kind, times, method, contains, header))

    def outage(self, kind: str = "503") -> None:
        """Every request from now on gets ``kind`` (503, 500 or reset)."""
        assert kind in ("503", "500", "reset"), kind
        with self._lock:
            self._outage = kind

    def end_outage(self) -> None:
        with self._lock:
            self._outage = None

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    def injected(self) -> int:
        return sum(self.counts.values())

    def saw(self, authorization: str | None, method: str, path: str) -> None:
        """Record the access key id of a SigV4 ``Authorization`` header ('' when unsigned)."""
        _, _, rest = (authorization or "").partition("Credential=")
        with self._lock:
            self.signed.append((rest.split("/", 1)[0], method, path))

    def choose(self, method: str, path: str, headers: str = "") -> str | None:
        """The fault for one request (None: forward it untouched)."""
        with self._lock:
            self.requests += 1
            fault = self._outage or self._forced_fault(method, path, headers)
            if fault is None and self.rate and self._rng.random() < self.rate:
                usable = [k for k in self.kinds if k != "cut" or _is_object_get(method, path)]
                fault = self._rng.choice(usable) if usable else None
            if fault:
                self.counts[fault] += 1
                self.log.append((method, path, fault))
            return fault

    def _forced_fault(self, method: str, path: str, headers: str) -> str | None:
        for rule in self._forced:
            if rule.remaining > 0 and rule.method in (None, method) and (
                rule.contains is None or rule.contains in path
            ) and (rule.header is None or rule.header in headers):
                if rule.kind == "cut" and not _is_object_get(method, path):
                    continue
                rule.remaining -= 1
                return rule.kind
        return None

    def delay_seconds(self) -> float:
        with self._lock:
            return self._rng.uniform(*self.delay)


def _is_object_get(method: str, path: str) -> bool:
    """GET of an object (path-style: /bucket/key...), not a listing or a bucket call."""
    route, _, query = path.partition("?")
    return method == "GET" and route.strip("/").count("/") >= 1 and "list-type" not in query


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool expects

    def log_message(self, *_: object) -> None:  # one line per request is noise
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        self.owner.saw(self.headers.get("Authorization"), self.command, self.path)
        fault = self.owner.choose(self.command, self.path, str(self.headers))
        if fault in _ERRORS:
            return self._error(*_ERRORS[fault])
        if fault == "reset":
            return self._hang_up()
        if fault == "delay":
            time.sleep(self.owner.delay_seconds())
        status, reason, headers, payload = self._forward(body)
        if fault == "drop":  # the server acted; the client never hears about it
            return self._hang_up()
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if fault == "cut" and len(payload) > 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            return self._hang_up()
        self.wfile.write(payload)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        target = urlsplit(self.owner.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            payload = response.read()
            keep = [(k, v) for k, v in response.getheaders()
                    if k.lower() not in _HOP and (self.command == "HEAD"
                                                  or k.lower() != "content-length")]
            return response.status, response.reason, keep, payload
        finally:
            conn.close()

    def _error(self, status: int, code: str) -> None:
        payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                   "<Message>injected by the fault proxy</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
