"""The index step with S3 input and output (moto's server on loopback)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from embedjob import layout
from embedjob.alphabets import PROTEIN
from embedjob.failures import ConfigError, InputError, StorageError, TransientStorageError
from embedjob.spec import parse_spec
from embedjob.store import open_store
from embedjob.worker.fasta import read_fasta
from embedjob.worker.index import load_summary, run_index


def make_spec(s3_bucket, inputs: list[str], out: str, shards: int = 4, **model: object):
    return parse_spec(
        {
            "input": {"uris": inputs},
            "output": {"uri": out},
            "shards": shards,
            "model": dict(model),
            "storage": {"endpointUrl": s3_bucket.endpoint, "region": "us-east-1"},
        }
    )


def put(s3_bucket, key: str, data: bytes) -> str:
    s3_bucket.client.put_object(Bucket=s3_bucket.bucket, Key=key, Body=data)
    return s3_bucket.uri(key)


def test_gzip_input_from_s3_to_s3(s3_bucket, proteins_fasta: Path, tmp_path: Path) -> None:
    data = proteins_fasta.read_bytes()
    uri = put(s3_bucket, "in/proteins.fa.gz", gzip.compress(data))
    spec = make_spec(s3_bucket, [uri], s3_bucket.uri("out/job1"), shards=3)
    out = open_store(spec.output.uri, spec.storage)
    summary = run_index(spec, out, job_name="job1")
    assert summary.sequences == 300 and summary.shards == 3

    local = tmp_path / "local"
    reference = run_index(
        parse_spec(
            {"input": {"uri": str(proteins_fasta)}, "output": {"uri": str(local)}, "shards": 3}
        ),
        open_store(str(local)),
    )
    assert summary.fingerprint == reference.fingerprint
    assert summary.shard_sequences == reference.shard_sequences
    for shard in range(3):
        assert (
            out.read_bytes(layout.shard_input(shard))
            == (local / layout.shard_input(shard)).read_bytes()
        )
    stored = json.loads(out.read_bytes(layout.SUMMARY))
    assert stored["inputs"] == [uri] and stored["fingerprint"] == summary.fingerprint
    assert sorted(out.list()) == sorted(
        [layout.SUMMARY, layout.TRUNCATED] + [layout.shard_input(s) for s in range(3)]
    )


def test_rerun_is_a_no_op_and_other_input_is_refused(s3_bucket, proteins_fasta: Path) -> None:
    uri = put(s3_bucket, "in/p.fa", proteins_fasta.read_bytes())
    spec = make_spec(s3_bucket, [uri], s3_bucket.uri("out/j"))
    out = open_store(spec.output.uri, spec.storage)
    first = run_index(spec, out)
    before = s3_bucket.client.head_object(Bucket=s3_bucket.bucket, Key="out/j/index/summary.json")
    assert run_index(spec, out) == first
    after = s3_bucket.client.head_object(Bucket=s3_bucket.bucket, Key="out/j/index/summary.json")
    assert after["LastModified"] == before["LastModified"] and after["ETag"] == before["ETag"]

    other = put(s3_bucket, "in/q.fa", b">q\nMKTAYIAKQR\n")
    with pytest.raises(ConfigError) as info:
        run_index(make_spec(s3_bucket, [other], s3_bucket.uri("out/j")), out)
    message = str(info.value)
    assert message.startswith(f"output s3://{s3_bucket.bucket}/out/j/ already holds a job")
    assert message.endswith("choose a new output.uri or delete it")
    assert load_summary(out) == first


def test_duplicates_across_s3_and_local_inputs(s3_bucket, write_file, tmp_path: Path) -> None:
    remote = put(s3_bucket, "in/a.fa.gz", gzip.compress(b">a\nMK\n>same\nMKT\n"))
    local = write_file("b.fa", ">b\nMK\n>same\nAC\n")
    spec = make_spec(s3_bucket, [remote, str(local)], str(tmp_path / "out"))
    with pytest.raises(InputError) as info:
        run_index(spec, open_store(str(tmp_path / "out")))
    assert f"record 2 of {remote} and record 2 of {local}" in str(info.value)


def test_missing_s3_input(s3_bucket, tmp_path: Path) -> None:
    spec = make_spec(s3_bucket, [s3_bucket.uri("in/none.fa")], str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"input s3://.*/in/none\.fa not found"):
        run_index(spec, open_store(str(tmp_path / "out")))


def test_invalid_s3_input_names_the_uri(s3_bucket, tmp_path: Path) -> None:
    uri = put(s3_bucket, "in/bad.fa", b">a\nMKT\n>b\nMKJ\n")
    with pytest.raises(InputError) as info:
        run_index(make_spec(s3_bucket, [uri], str(tmp_path / "out")),
                  open_store(str(tmp_path / "out")))  # fmt: skip
    assert str(info.value).startswith(f"{uri} line 4: invalid residue 'J' at position 3")


def test_denied_output_is_a_permanent_storage_error(s3_denied, write_file) -> None:
    fa = write_file("a.fa", ">a\nMKT\n")
    spec = make_spec(s3_denied, [str(fa)], s3_denied.uri("out"))
    with pytest.raises(StorageError, match="access denied") as info:
        run_index(spec, open_store(spec.output.uri, spec.storage))
    assert not isinstance(info.value, TransientStorageError)


def test_shard_inputs_are_valid_fasta(s3_bucket, proteins_fasta: Path) -> None:
    uri = put(s3_bucket, "in/p.fa", proteins_fasta.read_bytes())
    spec = make_spec(s3_bucket, [uri], s3_bucket.uri("out/v"), shards=7)
    out = open_store(spec.output.uri, spec.storage)
    summary = run_index(spec, out)
    ids = []
    for shard in range(summary.shards):
        with out.open_read(layout.shard_input(shard)) as stream:
            ids.extend(r.id for r in read_fasta(stream, "shard", PROTEIN))
    assert len(ids) == len(set(ids)) == 300
