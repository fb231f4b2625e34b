"""The operator's own API calls (embedjob/operator/rest.py) against loopback servers:
transport failures are bounded, one line, and an OSError (which the job loop logs as
``api_error`` and retries); an error answer keeps the server's words; every request carries
the client's current token."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator

import kopf
import pytest
import urllib3
from aiohttp import web
from kubernetes import client

from embedjob.operator import kube, rest


@contextlib.contextmanager
def server(behaviour: str) -> Iterator[int]:
    """A loopback TCP server that resets every connection or accepts and never answers."""
    sock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            if behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                conn.recv(65536)
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        sock.close()


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def session(port: int, read_timeout: float = 5.0) -> rest.Session:
    conf = client.Configuration(host=f"http://127.0.0.1:{port}")
    return rest.Session(conf, 4, connect_timeout=1.0, read_timeout=read_timeout)


async def delete_pod(port: int, read_timeout: float = 5.0) -> None:
    api = session(port, read_timeout)
    try:
        await api.call("delete pod", "DELETE", rest.path("api", "v1", "namespaces", "ns",
                                                           "pods", "p"))
    finally:
        await api.close()


@pytest.mark.parametrize("where", ["refused", "reset", "silent"])
def test_transport_errors_become_one_line_retryable_errors(where: str) -> None:
    with contextlib.ExitStack() as stack:
        port = closed_port() if where == "refused" else stack.enter_context(server(where))
        with pytest.raises(OSError) as caught:  # what the job loop catches and retries
            asyncio.run(delete_pod(port, read_timeout=0.3))
    err = caught.value
    assert isinstance(err, kube.ApiUnreachable)
    text = str(err)
    assert text.startswith("Kubernetes API unreachable (delete pod): "), text
    assert "\n" not in text and " object at 0x" not in text and text.endswith("; retrying")
    if where == "silent":
        assert "Timeout" in text, text  # bounded by the read timeout, and named as such


def test_a_silent_server_is_a_read_timeout_named_as_such() -> None:
    """The pod informer's urllib3 errors read the same way."""
    with server("silent") as port:
        pool = urllib3.PoolManager(retries=urllib3.Retry(total=1, read=0))
        with pytest.raises(urllib3.exceptions.HTTPError) as caught:
            pool.request("GET", f"http://127.0.0.1:{port}/api", timeout=urllib3.Timeout(
                connect=1.0, read=0.2))
    text = str(kube.unreachable("list_namespaced_pod", caught.value))
    assert "ReadTimeoutError" in text and "Read timed out" in text
    assert "HTTPConnectionPool" not in text


async def answering(handler: Callable[[web.Request], Awaitable[web.Response]],
                    calls: Callable[[rest.Session], Awaitable[None]],
                    conf: client.Configuration | None = None) -> None:
    """Run ``calls`` against a loopback aiohttp server answering with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    conf = conf or client.Configuration()
    conf.host = f"http://127.0.0.1:{port}"
    api = rest.Session(conf, 4, connect_timeout=1.0, read_timeout=5.0)
    try:
        await calls(api)
    finally:
        await api.close()
        await runner.cleanup()


def test_an_error_answer_is_an_api_exception_with_the_servers_words() -> None:
    status = {"kind": "Status", "code": 422, "message": 'Pod "p" is invalid: metadata.labels'}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(status, status=422, reason="Unprocessable Entity")

    async def calls(api: rest.Session) -> None:
        with pytest.raises(kube.ApiException) as caught:
            await api.call("create pod", "POST", "/api/v1/namespaces/ns/pods",
                           rest.encode({"kind": "Pod"}))
        assert caught.value.status == 422
        assert kube.describe(caught.value) == (
            '422 Unprocessable Entity: Pod "p" is invalid: metadata.labels')
        assert kube.permanent(caught.value)

    asyncio.run(answering(handler, calls))


def test_each_request_carries_the_clients_current_token_and_the_patch_type() -> None:
    seen: list[tuple[str, str, str | None, str | None, bytes]] = []
    tokens = iter(["first", "second"])

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.raw_path, request.headers.get("Authorization"),
                     request.headers.get("Content-Type"), await request.read()))
        return web.json_response({"kind": "Pod", "spec": {"x": "y" * 10_000}}, status=201)

    def refresh(conf: client.Configuration) -> None:  # what in-cluster config installs
        conf.api_key["authorization"] = next(tokens)

    conf = client.Configuration()
    conf.api_key_prefix["authorization"] = "Bearer"
    conf.api_key["authorization"] = "stale"
    conf.refresh_api_key_hook = refresh

    async def calls(api: rest.Session) -> None:
        await api.call("patch status", "PATCH", rest.path("apis", "g", "v1", "namespaces",
                                                          "ns", "jobs", "a b", "status"),
                       rest.encode({"status": {"phase": "Running"}}), rest.MERGE_PATCH)
        await api.call("delete pod", "DELETE", rest.path("api", "v1", "pods", "p"))

    asyncio.run(answering(handler, calls, conf))
    assert seen == [
        ("PATCH", "/apis/g/v1/namespaces/ns/jobs/a%20b/status", "Bearer first",
         rest.MERGE_PATCH, b'{"status":{"phase":"Running"}}'),
        ("DELETE", "/api/v1/pods/p", "Bearer second", None, b""),
    ]


def test_kopf_requests_get_the_same_limits() -> None:
    settings = kopf.OperatorSettings()
    assert settings.networking.connect_timeout is None  # kopf's default: unbounded
    kube.kopf_timeouts(settings)
    assert settings.networking.connect_timeout == kube.CONNECT_TIMEOUT_SECONDS
    assert settings.networking.request_timeout == kube.READ_TIMEOUT_SECONDS
    assert settings.watching.connect_timeout == kube.CONNECT_TIMEOUT_SECONDS
    assert settings.watching.client_timeout > 300  # past the server's own watch timeout
