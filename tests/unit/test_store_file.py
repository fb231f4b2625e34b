"""The local-disk store: round trips, atomic writes, create-once, listing, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from embedjob.failures import StorageError
from embedjob.store import FileStore, ObjectNotFound, open_store, open_uri

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return open_store(str(tmp_path / "out"))  # type: ignore[return-value]


def test_uri_forms_name_the_same_directory(tmp_path: Path) -> None:
    by_path = open_store(str(tmp_path / "a"))
    by_uri = open_store((tmp_path / "a").as_uri())
    by_slash = open_store(str(tmp_path / "a") + "/")
    assert by_path.uri == by_uri.uri == by_slash.uri == (tmp_path / "a").as_uri() + "/"


def test_round_trip_creates_parents(store: FileStore) -> None:
    store.write_bytes("shards/00001/progress.json", b'{"done": 3}')
    assert store.read_bytes("shards/00001/progress.json") == b'{"done": 3}'
    with store.open_read("shards/00001/progress.json") as f:
        assert f.read() == b'{"done": 3}'
    assert store.exists("shards/00001/progress.json")
    assert not store.exists("shards/00001/other.json")


def test_write_replaces_whole_and_leaves_no_temp(store: FileStore) -> None:
    store.write_bytes("k", b"first version, long")
    store.write_bytes("k", b"second")
    assert store.read_bytes("k") == b"second"
    assert os.listdir(store.root) == ["k"]


def test_failed_write_leaves_old_content(store: FileStore, tmp_path: Path) -> None:
    store.write_bytes("k", b"old")
    with pytest.raises(StorageError, match="not found"):
        store.upload_file("k", str(tmp_path / "missing-source"))
    assert store.read_bytes("k") == b"old"
    assert os.listdir(store.root) == ["k"]


def test_readers_never_see_a_partial_write(store: FileStore) -> None:
    """Readers racing a writer of large values see either the old or the new bytes."""
    old, new = b"a" * 4_000_000, b"b" * 4_000_000
    store.write_bytes("big", old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = store.read_bytes("big")
            seen.add(data[:1] + data[-1:] + str(len(data)).encode())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            store.write_bytes("big", new if i % 2 == 0 else old)
    finally:
        stop.set()
        thread.join()
    assert seen <= {b"aa4000000", b"bb4000000"}


def test_create_once(store: FileStore, tmp_path: Path) -> None:
    assert store.create_bytes("commits/1.json", b"first") is True
    assert store.create_bytes("commits/1.json", b"second") is False
    assert store.read_bytes("commits/1.json") == b"first"
    source = tmp_path / "part.bin"
    source.write_bytes(b"payload")
    assert store.create_file("parts/p", str(source)) is True
    # Exactly its own bytes already there: a retried create has succeeded.
    assert store.create_file("parts/p", str(source)) is True
    assert store.create_bytes("commits/1.json", b"first") is True
    source.write_bytes(b"another")
    assert store.create_file("parts/p", str(source)) is False
    assert store.read_bytes("parts/p") == b"payload"
    assert sorted(os.listdir(store.root / "commits")) == ["1.json"]


def test_create_once_under_contention(store: FileStore) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        results.append(store.create_bytes("once", str(i).encode()))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert store.read_bytes("once") in {str(i).encode() for i in range(8)}


def test_list_sorted_relative_and_by_prefix(store: FileStore) -> None:
    for key in ["b/2", "a/1", "a/10", "a/x/y", "c", "ab"]:
        store.write_bytes(key, b"")
    assert list(store.list()) == ["a/1", "a/10", "a/x/y", "ab", "b/2", "c"]
    assert list(store.list("a/")) == ["a/1", "a/10", "a/x/y"]
    assert list(store.list("a")) == ["a/1", "a/10", "a/x/y", "ab"]
    assert list(store.list("a/1")) == ["a/1", "a/10"]
    assert list(store.list("nothing/")) == []


def test_tags_change_with_every_write(store: FileStore) -> None:
    store.write_bytes("heartbeats/00001.json", b"1")
    store.write_bytes("heartbeats/00002.json", b"1")
    listed = dict(store.list_tagged("heartbeats/"))
    data, tag = store.read_tagged("heartbeats/00001.json")  # type: ignore[misc]
    assert data == b"1" and tag == listed["heartbeats/00001.json"]
    store.write_bytes("heartbeats/00001.json", b"1")  # the same bytes, written again
    assert dict(store.list_tagged("heartbeats/"))["heartbeats/00001.json"] != tag
    assert store.read_tagged("heartbeats/00003.json") is None


def test_child_and_delete(store: FileStore) -> None:
    shard = store.child("shards/00002/")
    shard.write_bytes("done.json", b"{}")
    assert store.exists("shards/00002/done.json")
    assert list(store.list("shards/")) == ["shards/00002/done.json"]
    shard.delete("done.json")
    shard.delete("done.json")  # missing is fine
    assert not store.exists("shards/00002/done.json")


def test_upload_and_download(store: FileStore, tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3_000_000))
    store.upload_file("x/y.bin", str(source))
    target = tmp_path / "deep" / "dst.bin"
    store.download_file("x/y.bin", str(target))
    assert target.read_bytes() == source.read_bytes()


def test_missing_key(store: FileStore) -> None:
    with pytest.raises(ObjectNotFound, match=r"not found: .*/nope"):
        store.read_bytes("nope")
    with pytest.raises(ObjectNotFound):
        store.open_read("nope")


def test_open_uri_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "in.fa"
    path.write_bytes(b">a\nAC\n")
    with open_uri(str(path)) as f:
        assert f.read() == b">a\nAC\n"
    with open_uri(path.as_uri()) as f:
        assert f.read() == b">a\nAC\n"
    with pytest.raises(ObjectNotFound, match="not found"):
        open_uri(str(tmp_path / "missing.fa"))


_WRITE_AS_NOBODY = """
import sys
from embedjob.failures import StorageError
from embedjob.store import open_store
try:
    open_store(sys.argv[1]).write_bytes("k", b"")
except StorageError as err:
    print(err)
"""


def test_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    target = str(locked / "out")
    try:
        if os.geteuid() == 0:  # root ignores permission bits: write as nobody
            tmp_path.chmod(0o755)
            try:
                done = subprocess.run(
                    [sys.executable, "-c", _WRITE_AS_NOBODY, target],
                    user=65534, capture_output=True, text=True, check=True, cwd=REPO,
                )  # fmt: skip
            except (PermissionError, subprocess.CalledProcessError):
                pytest.skip("running as root, and user nobody cannot run this Python")
            message = done.stdout.strip()
        else:
            with pytest.raises(StorageError) as info:
                open_store(target).write_bytes("k", b"")
            message = str(info.value)
        assert message == (
            f"cannot write to {target}: permission denied — choose a writable output.uri"
        )
    finally:
        locked.chmod(0o700)


def test_output_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not a directory"):
        open_store(str(tmp_path / "file" / "out")).write_bytes("k", b"")


def test_keys_cannot_escape_the_root(store: FileStore) -> None:
    for key in ["../x", "/etc/passwd", "a/../../x", "", "a//b"]:
        with pytest.raises(ValueError):
            store.write_bytes(key, b"")


def test_unsupported_scheme() -> None:
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        open_store("gs://bucket/x")
