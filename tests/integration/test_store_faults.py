"""The S3 store through a fault-injecting proxy in front of moto's server (tests/faultproxy.py):
lost responses, bodies cut mid-way, throttling; permanent errors still stop at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workerkit import spec_doc

from embedjob.failures import StorageError, TransientStorageError
from embedjob.store import S3Store, open_store


@pytest.fixture
def store(s3_proxied) -> S3Store:
    return open_store(s3_proxied.uri("jobs/one"), s3_proxied.storage)  # type: ignore[return-value]


def test_lost_response_to_a_create_once_put_is_a_success(store: S3Store, s3_proxied) -> None:
    """The PUT lands, its response is lost, botocore retries and gets 412 for its own
    If-None-Match: * — the bytes there are ours, so the create succeeded."""
    proxy = s3_proxied.proxy
    proxy.force("drop", method="PUT", contains="parts/p-0000")
    assert store.create_bytes("parts/p-0000.npz", b"payload") is True
    assert proxy.counts["drop"] == 1
    assert store.read_bytes("parts/p-0000.npz") == b"payload"
    # Someone else's bytes under the name are still a conflict.
    assert store.create_bytes("parts/p-0000.npz", b"other") is False


def test_lost_response_to_create_file_is_a_success(store: S3Store, s3_proxied,
                                                   tmp_path: Path) -> None:
    source = tmp_path / "shard.h5"
    source.write_bytes(os.urandom(300_000))
    s3_proxied.proxy.force("drop", method="PUT", contains="embeddings")
    assert store.create_file("shards/00000/embeddings.h5", str(source)) is True
    assert s3_proxied.proxy.counts["drop"] == 1
    assert store.read_bytes("shards/00000/embeddings.h5") == source.read_bytes()
    other = tmp_path / "other.h5"
    other.write_bytes(os.urandom(300_000))
    assert store.create_file("shards/00000/embeddings.h5", str(other)) is False


def test_body_cut_mid_read_is_resumed(store: S3Store, s3_proxied) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    store.write_bytes("big", data)
    s3_proxied.proxy.force("cut", times=3, method="GET", contains="big")
    assert store.read_bytes("big") == data
    assert s3_proxied.proxy.counts["cut"] == 3


def test_body_cut_on_every_try_gives_up_with_one_line(store: S3Store, s3_proxied,
                                                      monkeypatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    store.write_bytes("k", b"x" * 10_000)
    s3_proxied.proxy.force("cut", times=100, method="GET", contains="/k")
    with pytest.raises(TransientStorageError) as info:
        store.read_bytes("k")
    assert "connection broke mid-body 3 times" in str(info.value)
    assert s3_proxied.proxy.counts["cut"] == 3


def test_everything_survives_random_faults(store: S3Store, s3_proxied) -> None:
    """25 % of requests fail, stall, lose their response or cut their body: every create-once
    succeeds exactly once and every read returns the bytes written."""
    proxy = s3_proxied.proxy
    proxy.delay = (0.01, 0.05)
    proxy.set_rate(0.25)
    blobs = {f"parts/p-{i:04d}.npz": os.urandom(20_000 + i) for i in range(40)}
    for key, blob in blobs.items():
        assert store.create_bytes(key, blob) is True, key
    for key, blob in blobs.items():
        assert store.read_bytes(key) == blob
    assert sorted(store.list("parts/")) == sorted(blobs)
    proxy.set_rate(0)
    assert {"drop", "cut", "503"} <= set(proxy.counts), proxy.counts


def test_permanent_errors_are_immediate_and_one_line(s3_proxied, tmp_path: Path) -> None:
    """No such bucket through the proxy: one request, one line, no retry, no traceback."""
    proxy = s3_proxied.proxy
    store = open_store("s3://no-such-bucket-here/x", s3_proxied.storage)
    before = proxy.requests
    with pytest.raises(StorageError) as info:
        store.read_bytes("k")
    assert not isinstance(info.value, TransientStorageError)
    assert "bucket no-such-bucket-here does not exist" in str(info.value)
    assert proxy.requests - before == 1
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKV\n")
    doc = {"apiVersion": "embedjob.io/v1alpha1", "kind": "EmbeddingJob",
           "metadata": {"name": "nobucket"},
           "spec": spec_doc(str(fasta), "s3://no-such-bucket-here/out/",
                            storage={"endpointUrl": s3_proxied.endpoint})}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(doc))
    before = proxy.requests
    run = subprocess.run([sys.executable, "-m", "embedjob.cli", "run", str(spec)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr + run.stdout
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("embedjob: error:")]
    assert len(errors) == 1 and "no-such-bucket-here does not exist" in errors[0], run.stderr
    assert proxy.requests - before <= 3, "a permanent error must not be retried"


def test_access_denied_through_the_proxy_is_immediate(s3_denied, s3_proxied) -> None:
    """moto really refuses (IAM user without permissions): one request, one line."""
    store = open_store(s3_proxied.uri("x"), s3_proxied.storage)
    for attempt in (lambda: store.read_bytes("k"), lambda: store.create_bytes("c", b"v")):
        before = s3_proxied.proxy.requests
        with pytest.raises(StorageError) as info:
            attempt()
        assert not isinstance(info.value, TransientStorageError)
        assert "access denied" in str(info.value) and "\n" not in str(info.value)
        assert s3_proxied.proxy.requests - before == 1
