"""The S3 store against moto's server on loopback, through real boto3 and HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedjob.failures import StorageError, TransientStorageError
from embedjob.store import ObjectNotFound, S3Store, open_store, open_uri


@pytest.fixture
def store(s3_bucket) -> S3Store:
    return open_store(s3_bucket.uri("jobs/one"), s3_bucket.storage)  # type: ignore[return-value]


def test_uri_is_normalised(s3_bucket) -> None:
    for uri in (s3_bucket.uri("jobs/one"), s3_bucket.uri("jobs/one/"), s3_bucket.uri("/jobs/one")):
        assert open_store(uri, s3_bucket.storage).uri == f"s3://{s3_bucket.bucket}/jobs/one/"
    assert open_store(s3_bucket.uri(), s3_bucket.storage).uri == f"s3://{s3_bucket.bucket}/"


def test_round_trip_under_the_prefix(store: S3Store, s3_bucket) -> None:
    store.write_bytes("shards/00001/progress.json", b'{"done": 1}')
    assert store.read_bytes("shards/00001/progress.json") == b'{"done": 1}'
    raw = s3_bucket.client.get_object(
        Bucket=s3_bucket.bucket, Key="jobs/one/shards/00001/progress.json"
    )
    assert raw["Body"].read() == b'{"done": 1}'
    store.write_bytes("shards/00001/progress.json", b"{}")
    assert store.read_bytes("shards/00001/progress.json") == b"{}"
    assert store.exists("shards/00001/progress.json")
    assert not store.exists("shards/00001/nothing")


def test_create_once_uses_the_server_condition(store: S3Store, s3_bucket, tmp_path: Path) -> None:
    sent: list[dict[str, str]] = []

    def record(request, **_):  # what really goes over the wire
        sent.append(dict(request.headers))

    client = s3_bucket.client
    client.meta.events.register("before-send.s3.PutObject", record)
    try:
        assert store.create_bytes("commits/000000000.json", b"first") is True
        assert store.create_bytes("commits/000000000.json", b"second") is False
        source = tmp_path / "part"
        source.write_bytes(b"payload")
        assert store.create_file("parts/p.npz", str(source)) is True
        # Exactly its own bytes already there: a retried create has succeeded.
        assert store.create_file("parts/p.npz", str(source)) is True
        source.write_bytes(b"another")
        assert store.create_file("parts/p.npz", str(source)) is False
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", record)
    assert len(sent) == 5
    assert all(headers.get("If-None-Match") in ("*", b"*") for headers in sent)
    assert store.read_bytes("commits/000000000.json") == b"first"
    assert store.read_bytes("parts/p.npz") == b"payload"


def test_list_is_paginated_sorted_and_relative(store: S3Store, s3_bucket) -> None:
    keys = [f"shards/{s:05d}/parts/{p:09d}.npz" for s in range(3) for p in range(400)]
    for key in keys:
        s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key=f"jobs/one/{key}", Body=b"")
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="jobs/other/x", Body=b"")
    requests: list[str] = []

    def count(**_):
        requests.append("list")

    s3_bucket.client.meta.events.register("before-send.s3.ListObjectsV2", count)
    try:
        listed = list(store.list())
    finally:
        s3_bucket.client.meta.events.unregister("before-send.s3.ListObjectsV2", count)
    assert listed == sorted(keys)
    assert len(requests) == 2  # 1200 keys: two pages of at most 1000
    assert list(store.list("shards/00001/")) == [k for k in keys if k.startswith("shards/00001/")]
    assert list(store.child("shards/00002").list()) == [k[13:] for k in keys[800:]]


def test_tagged_listing_and_read_agree_and_change_with_every_write(store: S3Store) -> None:
    """What the operator's heartbeat poll relies on: a listing's ETag equals the GET's
    until the object is written again."""
    for shard in range(3):
        store.write_bytes(f"heartbeats/{shard:05d}.json", b'{"beat": 1}')
    store.write_bytes("shards/00000/progress.json", b"{}")
    listed = dict(store.list_tagged("heartbeats/"))
    assert sorted(listed) == [f"heartbeats/{s:05d}.json" for s in range(3)]
    data, tag = store.read_tagged("heartbeats/00001.json")  # type: ignore[misc]
    assert data == b'{"beat": 1}' and tag == listed["heartbeats/00001.json"]
    store.write_bytes("heartbeats/00001.json", b'{"beat": 2}')
    assert dict(store.list_tagged("heartbeats/"))["heartbeats/00001.json"] != tag
    assert store.read_tagged("heartbeats/00009.json") is None


def test_large_upload_download_and_streaming_read(store: S3Store, tmp_path: Path) -> None:
    data = os.urandom(9 * 1024 * 1024)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    store.upload_file("shards/00000/embeddings.h5", str(source))
    target = tmp_path / "sub" / "copy.bin"
    store.download_file("shards/00000/embeddings.h5", str(target))
    assert target.read_bytes() == data
    with store.open_read("shards/00000/embeddings.h5") as stream:
        chunks = iter(lambda: stream.read(1 << 20), b"")
        assert b"".join(chunks) == data
    assert [p.name for p in target.parent.iterdir()] == ["copy.bin"]  # no temp left behind


def test_delete_and_missing(store: S3Store, tmp_path: Path) -> None:
    store.write_bytes("k", b"v")
    store.delete("k")
    store.delete("k")  # missing is fine
    with pytest.raises(ObjectNotFound) as info:
        store.read_bytes("k")
    assert str(info.value) == f"not found: {store.uri}k"
    with pytest.raises(ObjectNotFound):
        store.download_file("k", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_open_uri_streams_an_object(s3_bucket) -> None:
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key="in/a.fa", Body=b">a\nMK\n")
    with open_uri(s3_bucket.uri("in/a.fa"), s3_bucket.storage) as f:
        assert f.read() == b">a\nMK\n"
    with pytest.raises(ObjectNotFound, match=r"not found: s3://.*/in/b\.fa"):
        open_uri(s3_bucket.uri("in/b.fa"), s3_bucket.storage)
    with pytest.raises(StorageError, match="names a prefix"):
        open_uri(s3_bucket.uri("in/"), s3_bucket.storage)


def test_no_such_bucket_is_permanent(s3_bucket) -> None:
    store = open_store("s3://no-such-bucket-here/x", s3_bucket.storage)
    with pytest.raises(StorageError) as info:
        store.write_bytes("k", b"")
    assert not isinstance(info.value, TransientStorageError)
    assert "bucket no-such-bucket-here does not exist" in str(info.value)


def test_access_denied_by_the_server(s3_denied) -> None:
    store = open_store(s3_denied.uri("x"), s3_denied.storage)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for attempt in (lambda: store.write_bytes("k", b""), lambda: store.read_bytes("k"),
                    lambda: list(store.list()), lambda: store.create_bytes("c", b"")):  # fmt: skip
        with pytest.raises(StorageError) as info:
            attempt()
        message = str(info.value)
        assert not isinstance(info.value, TransientStorageError)
        assert "access denied" in message and s3_denied.bucket in message
        assert "credentials" in message and "IRSA" in message
        assert secret not in message and os.environ["AWS_ACCESS_KEY_ID"] not in message


def test_unknown_access_key(s3_denied, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    with pytest.raises(StorageError, match="unknown access key"):
        open_store(s3_denied.uri("x"), s3_denied.storage).write_bytes("k", b"")


def test_throttling_and_5xx_are_retried(store: S3Store, s3_faults) -> None:
    s3_faults.inject(503, "SlowDown", times=1, operation="PutObject")
    s3_faults.inject(500, "InternalError", times=1, operation="PutObject")
    store.write_bytes("k", b"v")
    s3_faults.inject(503, "SlowDown", times=2, operation="GetObject")
    assert store.read_bytes("k") == b"v"
    assert s3_faults.injected == 4


def test_transient_errors_that_outlive_retries(store: S3Store, s3_faults, monkeypatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3_faults.inject(503, "SlowDown", times=2, operation="PutObject")
    with pytest.raises(TransientStorageError) as info:
        store.write_bytes("k", b"v")
    assert "SlowDown" in str(info.value) and "transient" in str(info.value)
    assert s3_faults.injected == 2
    assert not store.exists("k")


def test_conflicting_conditional_write_reports_the_truth(
    store: S3Store, s3_faults, monkeypatch
) -> None:
    """409 ConditionalRequestConflict: a concurrent conditional write to the key was in flight.
    If the key then exists, the other writer won (False); if not, nothing was written."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3_faults.inject(409, "ConditionalRequestConflict", times=100, operation="PutObject")
    with pytest.raises(TransientStorageError, match="409"):
        store.create_bytes("c", b"v")
    assert not store.exists("c")
    s3_faults.clear()
    store.write_bytes("d", b"v")
    s3_faults.inject(409, "ConditionalRequestConflict", times=100, operation="PutObject")
    assert store.create_bytes("d", b"w") is False
    s3_faults.clear()
    assert store.read_bytes("d") == b"v"


def test_unreachable_endpoint_is_transient(monkeypatch) -> None:
    from embedjob.spec import StorageSpec

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    dead = StorageSpec(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    with pytest.raises(TransientStorageError, match="cannot reach the S3 endpoint"):
        open_store("s3://bucket/x", dead).write_bytes("k", b"")
