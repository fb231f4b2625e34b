"""The index step on local files: balance, determinism, validation, idempotence."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from embedjob import layout
from embedjob.alphabets import PROTEIN
from embedjob.failures import ConfigError, InputError
from embedjob.spec import parse_spec
from embedjob.store import open_store
from embedjob.worker.fasta import read_fasta
from embedjob.worker.index import (
    ATTN_SCALE,
    IndexSummary,
    assign_shards,
    load_summary,
    run_index,
    sequence_costs,
)


def make_spec(inputs: list[str] | str, out: str, shards: int = 4, **model: object):
    source = {"uri": inputs} if isinstance(inputs, str) else {"uris": inputs}
    return parse_spec(
        {"input": source, "output": {"uri": out}, "shards": shards, "model": dict(model)}
    )


def real_lengths(proteins_fasta: Path) -> np.ndarray:
    with proteins_fasta.open("rb") as f:
        return np.array([len(r.seq) for r in read_fasta(f, "p", PROTEIN)])


def shard_records(out_dir: Path, shard: int) -> list[tuple[str, str]]:
    with (out_dir / layout.shard_input(shard)).open("rb") as f:
        return [tuple(r) for r in read_fasta(f, "shard", PROTEIN)]


# --- the pure sharding function --------------------------------------------------------------


def test_costs_grow_with_attention_and_respect_truncation() -> None:
    costs = sequence_costs([100, 1022, 5000], 1022)
    assert costs[0] == 100 + 100 * 100 // ATTN_SCALE
    assert costs[1] == costs[2]  # truncated to the same window
    windowed = sequence_costs([5000], 1022, long_sequences="window", window_overlap=256)
    assert windowed[0] == 7 * costs[1]  # 1 + ceil((5000 - 1022) / 766) windows


def test_balance_on_real_proteins(proteins_fasta: Path) -> None:
    lengths = real_lengths(proteins_fasta)
    costs = sequence_costs(lengths, 1022)
    for shards in (2, 3, 8, 16):
        assignment = assign_shards(lengths, shards, 1022)
        loads = np.bincount(assignment, weights=costs, minlength=shards)
        assert (loads > 0).all()
        assert loads.max() <= loads.mean() + costs.max()  # LPT: within one item of the mean
        assert loads.max() / loads.mean() < 1.05


def test_balance_beats_naive_contiguous_split(proteins_fasta: Path) -> None:
    lengths = real_lengths(proteins_fasta)
    costs = sequence_costs(lengths, 1022)
    balanced = np.bincount(assign_shards(lengths, 16, 1022), weights=costs).max()
    contiguous = max(chunk.sum() for chunk in np.array_split(costs, 16))
    assert balanced < contiguous


def test_assignment_is_deterministic_with_ties() -> None:
    lengths = [300] * 50 + [1200, 5, 5, 800] * 10
    first = assign_shards(lengths, 7, 1022)
    assert np.array_equal(first, assign_shards(list(lengths), 7, 1022))
    assert np.array_equal(first, assign_shards(np.array(lengths), 7, 1022))
    assert first.dtype == np.int32


def test_more_shards_than_sequences_are_clamped() -> None:
    assignment = assign_shards([10, 20, 30], 10, 1022)
    assert sorted(assignment.tolist()) == [0, 1, 2]
    assert assign_shards([10], 1, 1022).tolist() == [0]


# --- the step --------------------------------------------------------------------------------


def test_index_writes_shards_and_summary(proteins_fasta: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    summary = run_index(make_spec(str(proteins_fasta), str(out_dir), 5), open_store(str(out_dir)))
    assert summary.shards == 5 and summary.sequences == 300
    lengths = real_lengths(proteins_fasta)
    assert summary.residues == int(lengths.sum())
    assert summary.max_length == int(lengths.max())
    assert summary.fingerprint.startswith("sha256:")
    assert sum(summary.shard_sequences) == 300
    assert sum(summary.shard_residues) == summary.residues

    with proteins_fasta.open("rb") as f:
        original = [tuple(r) for r in read_fasta(f, "p", PROTEIN)]
    position = {rec_id: i for i, (rec_id, _) in enumerate(original)}
    seen = []
    for shard in range(5):
        records = shard_records(out_dir, shard)
        assert len(records) == summary.shard_sequences[shard]
        assert sum(len(s) for _, s in records) == summary.shard_residues[shard]
        order = [position[rec_id] for rec_id, _ in records]
        assert order == sorted(order)  # input order within a shard
        seen.extend(records)
    assert sorted(seen) == sorted(original)  # every record exactly once, unchanged

    on_disk = json.loads((out_dir / layout.SUMMARY).read_text())
    assert on_disk["version"] == 1 and on_disk["shards"] == 5 and on_disk["sequences"] == 300
    assert on_disk["model"] == "esm2_t6_8M_UR50D" and on_disk["alphabet"] == "protein"
    assert on_disk["inputs"] == [str(proteins_fasta)]
    assert load_summary(open_store(str(out_dir))) == summary
    assert IndexSummary.from_json(summary.to_json()) == summary


def test_index_is_deterministic(proteins_fasta: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        run_index(make_spec(str(proteins_fasta), str(tmp_path / name), 6),
                  open_store(str(tmp_path / name)))  # fmt: skip
    for key in [layout.SUMMARY] + [layout.shard_input(s) for s in range(6)]:
        assert (tmp_path / "a" / key).read_bytes() == (tmp_path / "b" / key).read_bytes()


def test_gzip_input_has_the_same_fingerprint(proteins_fasta: Path, tmp_path: Path) -> None:
    gz = tmp_path / "proteins.fa.gz"
    gz.write_bytes(gzip.compress(proteins_fasta.read_bytes()))
    plain = run_index(make_spec(str(proteins_fasta), str(tmp_path / "p")),
                      open_store(str(tmp_path / "p")))  # fmt: skip
    packed = run_index(make_spec(gz.as_uri(), str(tmp_path / "g")),
                       open_store(str(tmp_path / "g")))  # fmt: skip
    assert packed.fingerprint == plain.fingerprint
    assert packed.shard_sequences == plain.shard_sequences


def test_several_inputs(write_file, tmp_path: Path) -> None:
    a = write_file("a.fa", ">a1\nMKT\n>a2\nMKTAY\n")
    b = write_file("b.fa.gz", gzip.compress(b">b1\nACDEF\n"))
    summary = run_index(make_spec([str(a), str(b)], str(tmp_path / "o"), 2),
                        open_store(str(tmp_path / "o")))  # fmt: skip
    assert summary.sequences == 3 and summary.inputs == (str(a), str(b))


def test_shards_clamped_to_sequence_count(write_file, tmp_path: Path) -> None:
    fa = write_file("a.fa", ">a\nMKT\n>b\nMK\n")
    summary = run_index(make_spec(str(fa), str(tmp_path / "o"), 8), open_store(str(tmp_path / "o")))
    assert summary.shards == 2 and summary.requested_shards == 8
    assert not (tmp_path / "o" / layout.shard_input(2)).exists()


def test_duplicate_ids_across_files_name_both(write_file, tmp_path: Path) -> None:
    a = write_file("a.fa", ">x\nMK\n>dup desc\nMKT\n")
    b = write_file("b.fa", ">y\nMK\n>z\nMK\n>dup\nAC\n")
    with pytest.raises(InputError) as info:
        run_index(make_spec([str(a), str(b)], str(tmp_path / "o")), open_store(str(tmp_path / "o")))
    message = str(info.value)
    assert "duplicate id 'dup'" in message
    assert f"record 2 of {a}" in message and f"record 3 of {b}" in message
    assert not (tmp_path / "o" / layout.SUMMARY).exists()


def test_bad_input_fails_before_writing_anything(write_file, tmp_path: Path) -> None:
    fa = write_file("a.fa", ">a\nMKT\n>b\nMK1\n")
    with pytest.raises(InputError, match="position 3"):
        run_index(make_spec(str(fa), str(tmp_path / "o")), open_store(str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_missing_input(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.fa")
    with pytest.raises(InputError, match=r"input .*nope\.fa not found — check input\.uri"):
        run_index(make_spec(missing, str(tmp_path / "o")), open_store(str(tmp_path / "o")))


def test_rerun_returns_the_existing_summary(proteins_fasta: Path, tmp_path: Path) -> None:
    out = open_store(str(tmp_path / "o"))
    first = run_index(make_spec(str(proteins_fasta), str(tmp_path / "o")), out)
    summary_file = tmp_path / "o" / layout.SUMMARY
    stamp = summary_file.stat().st_mtime_ns
    shard_file = tmp_path / "o" / layout.shard_input(0)
    shard_file.write_bytes(b">marker\nMK\n")  # a re-run must not rewrite shard inputs
    again = run_index(make_spec(str(proteins_fasta), str(tmp_path / "o")), out)
    assert again == first
    assert summary_file.stat().st_mtime_ns == stamp
    assert shard_file.read_bytes() == b">marker\nMK\n"


def test_different_input_into_same_output_is_refused(write_file, tmp_path: Path) -> None:
    out = open_store(str(tmp_path / "o"))
    a = write_file("a.fa", ">a\nMKT\n")
    run_index(make_spec(str(a), str(tmp_path / "o"), 1), out)
    a.write_bytes(b">a\nMKTA\n")  # same name, other content
    with pytest.raises(ConfigError) as info:
        run_index(make_spec(str(a), str(tmp_path / "o"), 1), out)
    assert "already holds a job for a different input/model" in str(info.value)
    assert "choose a new output.uri or delete it" in str(info.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "esm2_t12_35M_UR50D"}, "model"),
        ({"pooling": "cls"}, "pooling"),
        ({"layer": 3}, "layer"),
    ],
)
def test_different_model_settings_are_refused(write_file, tmp_path: Path, change, field) -> None:
    out = open_store(str(tmp_path / "o"))
    a = write_file("a.fa", ">a\nMKT\n")
    run_index(make_spec(str(a), str(tmp_path / "o"), 1), out)
    with pytest.raises(ConfigError, match=field):
        run_index(make_spec(str(a), str(tmp_path / "o"), 1, **change), out)


def test_different_shard_count_is_refused(write_file, tmp_path: Path) -> None:
    out = open_store(str(tmp_path / "o"))
    a = write_file("a.fa", ">a\nMKT\n>b\nMK\n")
    run_index(make_spec(str(a), str(tmp_path / "o"), 1), out)
    with pytest.raises(ConfigError, match="shards"):
        run_index(make_spec(str(a), str(tmp_path / "o"), 2), out)


def test_corrupt_summary_is_named(tmp_path: Path) -> None:
    out = open_store(str(tmp_path / "o"))
    out.write_bytes(layout.SUMMARY, b"{not json")
    with pytest.raises(ConfigError, match="delete it to re-index"):
        load_summary(out)


def test_shard_files_with_a_tiny_buffer_keep_input_order(tmp_path: Path) -> None:
    """Pass 2's bounded buffers flush often and still write each shard in input order."""
    from embedjob.worker.fasta import Record
    from embedjob.worker.index import _ShardFiles

    files = _ShardFiles(tmp_path, 3, limit=500)
    for i in range(200):
        files.add(i % 3, Record(f"s{i}", "MKTAYIAKQR" * (1 + i % 7)))
    files.close()
    for shard, path in enumerate(files.paths):
        with path.open("rb") as f:
            numbers = [int(r.id[1:]) for r in read_fasta(f, "shard", PROTEIN)]
        assert numbers == list(range(shard, 200, 3))
    assert files.buffered == 0
