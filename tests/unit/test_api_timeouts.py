"""Transport failures of Kubernetes API calls: bounded, one line, and an OSError (which the
job loop logs as ``api_error`` and retries) instead of urllib3 errors escaping the loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

import kopf
import pytest
import urllib3
from kubernetes import client

from embedjob.operator import kube


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


def core_api(port: int) -> client.CoreV1Api:
    conf = client.Configuration(host=f"http://127.0.0.1:{port}")
    conf.retries = 0  # urllib3's own retries would only make the test slower
    return client.CoreV1Api(client.ApiClient(conf))


@pytest.mark.parametrize("where", ["refused", "reset"])
def test_transport_errors_become_one_line_retryable_errors(where: str) -> None:
    with contextlib.ExitStack() as stack:
        port = closed_port() if where == "refused" else stack.enter_context(server("reset"))
        delete = core_api(port).delete_namespaced_pod
        with pytest.raises(OSError) as caught:  # what the job loop catches and retries
            asyncio.run(kube._call(delete, "p", "ns"))
    err = caught.value
    assert isinstance(err, kube.ApiUnreachable)
    text = str(err)
    assert text.startswith("Kubernetes API unreachable (delete_namespaced_pod): ")
    assert "\n" not in text and " object at 0x" not in text and text.endswith("; retrying")


def test_a_silent_server_is_a_read_timeout_named_as_such() -> None:
    with server("silent") as port:
        pool = urllib3.PoolManager(retries=urllib3.Retry(total=1, read=0))
        with pytest.raises(urllib3.exceptions.HTTPError) as caught:
            pool.request("GET", f"http://127.0.0.1:{port}/api", timeout=urllib3.Timeout(
                connect=1.0, read=0.2))
    text = str(kube.unreachable("list_namespaced_pod", caught.value))
    assert "ReadTimeoutError" in text and "Read timed out" in text
    assert "HTTPConnectionPool" not in text


def test_every_call_carries_a_request_timeout_and_drains_the_answer() -> None:
    seen: list[tuple[object, object]] = []
    released: list[str] = []

    class Answer:  # urllib3's response, as the client returns it without preloading
        def drain_conn(self) -> None:
            released.append("drained")

        def release_conn(self) -> None:
            released.append("released")

    def api_method(*args: object, _request_timeout: object = None,
                   _preload_content: object = True) -> Answer:
        seen.append((_request_timeout, _preload_content))
        return Answer()

    assert asyncio.run(kube._call(api_method, "ns")) is None
    assert seen == [((kube.CONNECT_TIMEOUT_SECONDS, kube.READ_TIMEOUT_SECONDS), False)]
    assert released == ["drained", "released"]  # the connection goes back to the pool


def test_kopf_requests_get_the_same_limits() -> None:
    settings = kopf.OperatorSettings()
    assert settings.networking.connect_timeout is None  # kopf's default: unbounded
    kube.kopf_timeouts(settings)
    assert settings.networking.connect_timeout == kube.CONNECT_TIMEOUT_SECONDS
    assert settings.networking.request_timeout == kube.READ_TIMEOUT_SECONDS
    assert settings.watching.connect_timeout == kube.CONNECT_TIMEOUT_SECONDS
    assert settings.watching.client_timeout > 300  # past the server's own watch timeout
