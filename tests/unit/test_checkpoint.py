"""Checkpoint parts on a real FileStore: commit, validate, reject, resolve overlaps."""

import json
import time

import h5py
import numpy as np
import pytest

from embedjob import layout
from embedjob.store import open_store
from embedjob.worker.assemble import assemble_shard
from embedjob.worker.checkpoint import (
    PartWriter,
    ProgressState,
    clean_uncommitted,
    load_committed,
    next_part_index,
)

IDS = [f"seq{i}" for i in range(10)]
DIM = 4


def _progress(attempt: int = 0) -> ProgressState:
    return ProgressState(shard=0, attempt=attempt, total=len(IDS), committed=0, parts=0,
                         started=time.time(), committed_at_start=0, batch_tokens=100,
                         precision="fp32")


def _emb(rows: list[int], scale: float = 1.0) -> np.ndarray:
    return np.asarray([[r * scale] * DIM for r in rows], dtype=np.float32)


def _write(store, rows_per_part: list[list[int]], attempt: int = 0, scale: float = 1.0) -> None:
    writer = PartWriter(store, _progress(attempt), every_sequences=1000, every_seconds=1e9)
    for rows in rows_per_part:
        writer.add(np.asarray(rows), [IDS[r] for r in rows], _emb(rows, scale))
        writer.flush()
    assert writer.close(timeout=30)


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "out"))


def test_committed_parts_cover_their_rows_and_progress_is_written(store) -> None:
    _write(store, [[0, 1, 2], [5, 6]])
    committed = load_committed(store, 0, IDS)
    assert committed.count == 5 and len(committed.parts) == 2
    assert np.flatnonzero(committed.done).tolist() == [0, 1, 2, 5, 6]
    progress = json.loads(store.read_bytes(layout.shard_progress(0)))
    assert progress["done"] == 5 and progress["parts"] == 2 and progress["total"] == 10


def test_due_by_count_and_by_time(store) -> None:
    writer = PartWriter(store, _progress(), every_sequences=3, every_seconds=0.05)
    writer.add(np.asarray([0, 1]), IDS[:2], _emb([0, 1]))
    assert not writer.due()
    time.sleep(0.06)
    assert writer.due()
    writer.flush()
    writer.add(np.asarray([2, 3, 4]), IDS[2:5], _emb([2, 3, 4]))
    assert writer.due()
    assert writer.close(timeout=30)


def test_uncommitted_part_does_not_count_and_is_cleaned(store) -> None:
    _write(store, [[0, 1]])
    # A part whose upload finished but whose commit record never got written (killed between).
    store.write_bytes(layout.part_key(0, layout.part_name(0, 7)), b"half a part")
    committed = load_committed(store, 0, IDS)
    assert committed.count == 2
    assert clean_uncommitted(store, 0, attempt=1, committed=committed) == 1
    assert clean_uncommitted(store, 0, attempt=1, committed=committed) == 0


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_damaged_committed_part_is_rejected(store, damage: str) -> None:
    _write(store, [[0, 1], [2, 3]])
    key = layout.part_key(0, layout.part_name(0, 1))
    data = store.read_bytes(key)
    if damage == "truncate":
        store.write_bytes(key, data[: len(data) // 2])
    elif damage == "garble":
        store.write_bytes(key, data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])
    else:
        store.delete(key)
    committed = load_committed(store, 0, IDS)
    assert np.flatnonzero(committed.done).tolist() == [0, 1]
    assert not store.exists(layout.commit_key(0, layout.part_name(0, 1)))


def test_part_from_another_input_is_rejected(store) -> None:
    _write(store, [[0, 1]])
    other = [f"other{i}" for i in range(10)]
    assert load_committed(store, 0, other).count == 0


def test_overlapping_attempts_resolve_to_the_first_part_in_name_order(store, tmp_path) -> None:
    _write(store, [[0, 1, 2, 3, 4]], attempt=0, scale=1.0)
    _write(store, [[3, 4, 5, 6, 7, 8, 9]], attempt=1, scale=100.0)  # a late writer
    committed = load_committed(store, 0, IDS)
    keep = np.ones(len(IDS), dtype=bool)
    keep[9] = False  # quarantined
    work = tmp_path / "work"
    work.mkdir()
    path = assemble_shard(store, 0, IDS, committed, keep, dim=DIM, dtype="float32",
                          attrs={"model": "m"}, workdir=work)
    with h5py.File(path) as h5:
        ids = [i.decode() for i in h5["ids"][:]]
        emb = h5["embeddings"][:]
        assert ids == IDS[:9]
        assert emb[:, 0].tolist() == [0, 1, 2, 3, 4, 500, 600, 700, 800]
        assert h5.attrs["model"] == "m"


def test_assembly_refuses_missing_rows(store, tmp_path) -> None:
    _write(store, [[0, 1]])
    committed = load_committed(store, 0, IDS)
    with pytest.raises(Exception, match="have no committed part"):
        assemble_shard(store, 0, IDS, committed, np.ones(10, dtype=bool), dim=DIM,
                       dtype="float32", attrs={}, workdir=tmp_path)


def test_a_later_pass_of_the_same_attempt_never_reuses_a_part_name(store) -> None:
    _write(store, [[0, 1], [2]])
    assert next_part_index(store, 0, attempt=0) == 2
    assert next_part_index(store, 0, attempt=1) == 0
    writer = PartWriter(store, _progress(), every_sequences=1000, every_seconds=1e9,
                        first_index=next_part_index(store, 0, 0))
    writer.add(np.asarray([5, 6]), [IDS[5], IDS[6]], _emb([5, 6]))
    assert writer.close(timeout=30)
    assert np.flatnonzero(load_committed(store, 0, IDS).done).tolist() == [0, 1, 2, 5, 6]


def test_a_reused_part_name_fails_and_keeps_the_committed_part(store) -> None:
    _write(store, [[0, 1]])
    writer = PartWriter(store, _progress(), every_sequences=1000, every_seconds=1e9)
    writer.add(np.asarray([2, 3]), [IDS[2], IDS[3]], _emb([2, 3]))
    assert not writer.close(timeout=30)
    assert np.flatnonzero(load_committed(store, 0, IDS).done).tolist() == [0, 1]
