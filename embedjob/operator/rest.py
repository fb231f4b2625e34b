"""The operator's own API calls over aiohttp, on the event loop.

Not the official client in threads: its urllib3 and http.client are pure Python, and 16
threads running them made the loop wait for the GIL (a schedstat trace at 10^4 shards:
the loop blocked 71 ms with no pass or collection running, while the API threads took
turns). aiohttp is kopf's own HTTP client (installed with it); it parses answers in C on
the loop, and a call that waits holds no thread. The official client still does what it is
good at: loading credentials (in-cluster ServiceAccount, kubeconfig, exec plugins) into a
``Configuration``, whose token hook is asked on every request, as the client itself does.

Hand-rolled over a generated asyncio client (kubernetes_asyncio) because the operator makes
five kinds of write whose answers it never reads, and a generated client's models are the
CPU this module exists to avoid.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes import client
from kubernetes.client.exceptions import ApiException

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


class ApiUnreachable(ConnectionError):
    """The API server did not answer (timeout, refused or reset connection, TLS error).

    An OSError, so the job loop's handler for API hiccups logs it and retries after a short
    pause instead of leaving the daemon to kopf's backoff."""


class Session:
    """One connection pool to the API server, bound to the event loop that made it."""

    def __init__(self, conf: client.Configuration, connections: int,
                 connect_timeout: float, read_timeout: float) -> None:
        self.conf = conf
        self.base = conf.host.rstrip("/")
        self.loop = asyncio.get_running_loop()
        # sock_read bounds each wait for bytes, as urllib3's read timeout did; a call
        # waiting for a free connection waits as long as it must (callers bound how many
        # calls there are: see main.API_CONCURRENCY).
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, ssl=_tls(conf)),
            timeout=timeout,
            headers={"Accept": JSON, "User-Agent": "embedjob-operator"},
        )
        # The route is the same for every request: worked out once, not per pod.
        self.route: dict[str, Any] = {}
        if conf.proxy:
            self.route |= {"proxy": conf.proxy, "proxy_headers": conf.proxy_headers}
        if conf.tls_server_name:
            self.route["server_hostname"] = conf.tls_server_name

    def usable(self) -> bool:
        return not self.http.closed and self.loop is asyncio.get_running_loop()

    async def close(self) -> None:
        await self.http.close()

    async def call(self, what: str, method: str, path: str,
                   body: bytes | None = None, content_type: str = JSON) -> None:
        """One request with an encoded body (:func:`encode`); the answer is drained, never
        parsed. Raises ApiException (with the server's Status as its body) for an error
        answer, ApiUnreachable for none."""
        headers = {"Content-Type": content_type} if body is not None else {}
        token = bearer(self.conf)
        if token:
            headers["Authorization"] = token
        try:
            async with self.http.request(method, self.base + path, data=body,
                                         headers=headers, **self.route) as answer:
                data = await answer.read()
                status, reason = answer.status, answer.reason
        except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as err:
            raise unreachable(what, err) from None
        if status >= 400:
            error = ApiException(status=status, reason=reason)
            error.body = data.decode(errors="replace")
            raise error


def bearer(conf: client.Configuration) -> str | None:
    """The Authorization header's value as the configuration has it now (its refresh hook
    runs first, as before each of the official client's requests); None without a token."""
    value = conf.auth_settings().get("BearerToken", {}).get("value")
    return str(value) if value else None


def encode(body: Any) -> bytes:
    """A request body: JSON, as bytes (which the collector never walks)."""
    return json.dumps(body, separators=(",", ":")).encode()


def path(*parts: str) -> str:
    """``/a/b/c`` with each part quoted (names come from users' resources)."""
    return "".join("/" + quote(part, safe="") for part in parts)


def unreachable(what: str, err: BaseException) -> ApiUnreachable:
    """One line: what was called and the innermost reason, without a connection's repr."""
    reason = getattr(err, "reason", None)
    cause = reason if isinstance(reason, BaseException) else err
    if isinstance(cause, aiohttp.ClientConnectorError):
        cause = cause.os_error
    text = str(cause).split(": ", 1)[-1] or "no answer in time"
    return ApiUnreachable(
        f"Kubernetes API unreachable ({what}): {type(cause).__name__}: {text}; retrying")


def _tls(conf: client.Configuration) -> ssl.SSLContext | bool:
    """The TLS the official client would use: its CA, client certificate, verification."""
    if not conf.verify_ssl:
        return False
    context = ssl.create_default_context(cafile=conf.ssl_ca_cert)
    if conf.cert_file:
        context.load_cert_chain(conf.cert_file, conf.key_file)
    if conf.assert_hostname is False:
        context.check_hostname = False
    return context
