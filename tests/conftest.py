"""Shared fixtures: a real S3 (moto's server on loopback), buckets, faults, sample data.

- ``s3_server``: the endpoint URL of one ThreadedMotoServer per test session.
- ``s3_bucket``: a fresh bucket per test, with dummy AWS credentials in the environment
  (inherited by subprocesses); ``.uri(prefix)``, ``.storage`` (a StorageSpec), ``.client``.
- ``s3_proxied``: ``s3_bucket`` behind a fault-injecting HTTP proxy (tests/faultproxy.py):
  503/500, delays, responses dropped after the server acted, bodies cut mid-way.
- ``s3_faults``: inject S3 error responses (503 SlowDown, 500, 403, ...) between boto3 and
  moto with a botocore ``before-send`` hook, for the next N matching requests.
- ``s3_denied``: turn on moto's IAM checks and switch the environment to an IAM user with no
  permissions, so every S3 call is really refused (AccessDenied) by the server.
- ``proteins_fasta``: examples/data/proteins.fa (300 real proteins, some > 1022 aa).
"""

from __future__ import annotations

import logging
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from embedjob.spec import StorageSpec
from embedjob.store import s3_client

REPO = Path(__file__).resolve().parent.parent
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class S3Bucket:
    endpoint: str
    bucket: str
    storage: StorageSpec

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.lstrip('/')}"

    @property
    def client(self) -> Any:
        """The same cached boto3 client the store uses for this endpoint."""
        return s3_client(self.storage)


def aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials (moto accepts any) and no user AWS config leaking in."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh, empty bucket on the session's moto server."""
    aws_test_env(monkeypatch)
    bucket = S3Bucket(
        endpoint=s3_server,
        bucket=f"test-{uuid.uuid4().hex[:16]}",
        storage=StorageSpec(endpoint_url=s3_server, region=REGION),
    )
    bucket.client.create_bucket(Bucket=bucket.bucket)
    return bucket


# --- fault injection --------------------------------------------------------------------------


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


@dataclass
class _Fault:
    status: int
    code: str
    remaining: int
    operation: str | None
    seen: list[str] = field(default_factory=list)


class S3Faults:
    """Answer the next N matching S3 requests with an error instead of sending them."""

    def __init__(self, storage: StorageSpec) -> None:
        self.storage = storage
        self.faults: list[_Fault] = []
        self.injected = 0
        self._clients: list[Any] = []

    def inject(self, status: int = 503, code: str = "SlowDown", times: int = 1,
               operation: str | None = None) -> None:  # fmt: skip
        """``operation``: a botocore operation name (``PutObject``), or None for any.

        Registers on the client that is cached for the current environment, so set
        AWS_MAX_ATTEMPTS etc. before calling this."""
        client = s3_client(self.storage)
        if client not in self._clients:
            client.meta.events.register("before-send.s3", self._before_send)
            self._clients.append(client)
        self.faults.append(_Fault(status, code, times, operation))

    def _before_send(self, request: Any, event_name: str = "", **_: Any) -> Any:
        operation = event_name.rpartition(".")[2]  # before-send.s3.PutObject
        for fault in self.faults:
            if fault.remaining > 0 and fault.operation in (None, operation):
                fault.remaining -= 1
                fault.seen.append(str(operation))
                self.injected += 1
                body = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                    f"<Message>injected by the test</Message></Error>"
                ).encode()
                from botocore.awsrequest import AWSResponse

                return AWSResponse(request.url, fault.status, {}, _Raw(body))
        return None

    def clear(self) -> None:
        """Drop the faults not yet used."""
        self.faults.clear()

    def close(self) -> None:
        for client in self._clients:
            client.meta.events.unregister("before-send.s3", self._before_send)


@pytest.fixture
def s3_faults(s3_bucket: S3Bucket) -> Iterator[S3Faults]:
    faults = S3Faults(s3_bucket.storage)
    try:
        yield faults
    finally:
        faults.close()


# --- a fault-injecting proxy in front of moto ---------------------------------------------------


@dataclass
class ProxiedBucket(S3Bucket):
    """``s3_bucket`` seen through :class:`faultproxy.FaultProxy` (its ``endpoint`` is the
    proxy's URL; ``proxy.rate``/``proxy.force`` choose the faults)."""

    proxy: Any = None


@pytest.fixture
def s3_proxied(s3_bucket: S3Bucket) -> Iterator[ProxiedBucket]:
    from faultproxy import FaultProxy

    proxy = FaultProxy(upstream=s3_bucket.endpoint, seed=7).start()
    try:
        yield ProxiedBucket(endpoint=proxy.url, bucket=s3_bucket.bucket,
                            storage=StorageSpec(endpoint_url=proxy.url, region=REGION),
                            proxy=proxy)
    finally:
        proxy.stop()


# --- real access denial -------------------------------------------------------------------------


def _moto_auth(endpoint: str, count: str) -> None:
    """moto's server checks IAM signatures and policies once this many requests have passed."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@pytest.fixture
def s3_denied(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """``s3_bucket`` seen through credentials of an IAM user without any permission.

    moto's IAM checks are global to its server: they are switched off again afterwards.
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_bucket.endpoint, region_name=REGION)
    user = f"denied-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    _moto_auth(s3_bucket.endpoint, "0")
    try:
        yield s3_bucket
    finally:
        _moto_auth(s3_bucket.endpoint, "inf")


# --- data -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def proteins_fasta() -> Path:
    """300 real proteins (pyrodigal on a bacterial genome), median ~285 aa, 3 > 1022 aa."""
    return REPO / "examples" / "data" / "proteins.fa"


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, bytes | str], Path]:
    """Write a small file under tmp_path: ``write_file("a.fa", ">x\\nACD\\n")``."""

    def write(name: str, content: bytes | str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return write
