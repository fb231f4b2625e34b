"""The index step: validate the input, balance it over shards, write the shards' inputs.

Memory stays flat in the sequence data. Pass 1 streams every input once and keeps, per
sequence, only its length (uint32) and a 64-bit hash of its id (int64): 12 bytes a sequence,
~120 MB for 10^7 sequences. Duplicate ids are found by sorting the hashes; only when two
hashes collide is the input read again, keeping just the colliding ids, to name both
occurrences (or to dismiss a hash collision). Pass 2 streams the input again and appends
each record to its shard's local temp file through bounded per-shard buffers (never the whole
input in memory, never thousands of open files); the temp files then upload in parallel.
Local temp space needed: the uncompressed input (``TMPDIR`` chooses where).

``index/summary.json`` is written last and created once: its presence means every shard
input is in place. A re-run over the same input and settings returns it untouched; a
different input or model into the same output is refused.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedjob import layout
from embedjob.alphabets import Alphabet, alphabet_for, check_fits
from embedjob.failures import ConfigError, InputError
from embedjob.spec import EmbeddingJobSpec, StorageSpec
from embedjob.store import ObjectNotFound, Store, open_uri
from embedjob.summary import IndexSummary, load_summary
from embedjob.weights_id import weights_identity
from embedjob.worker.fasta import Record, read_fasta

log = logging.getLogger(__name__)

ATTN_SCALE = 1024
"""Cost of a sequence of L tokens ~ L + L²/ATTN_SCALE. Per layer and token, the dense parts
(QKV, output projection, FFN) cost ~24·d² FLOPs and attention ~4·L·d, a ratio of L/(6d):
6d is 1920 for ESM-2 8M and grows with the model. But the L² score matrix is also written,
soft-maxed and read per head, which is memory-bound and not in the FLOP count, so attention
weighs more than FLOPs say, most on small models and CPUs. 1024 sits at that end: at the
1022-residue window the quadratic term doubles a sequence's cost. Balance is insensitive to
the exact value; it only has to rank long sequences as disproportionately expensive."""

_BUFFER_BYTES = 64 * 1024 * 1024  # pass-2 buffering across all shards
_UPLOAD_THREADS = 8


# --- sharding (pure) -------------------------------------------------------------------------


def sequence_costs(
    lengths: Sequence[int] | np.ndarray,
    max_residues: int,
    *,
    long_sequences: str = "truncate",
    window_overlap: int = 0,
) -> np.ndarray:
    """Estimated work per sequence (int64): tokens plus the attention term, per window."""
    lengths = np.asarray(lengths, dtype=np.int64)
    window = np.minimum(lengths, max_residues)
    if long_sequences == "window":
        stride = max(max_residues - window_overlap, 1)
        extra = np.maximum(lengths - max_residues, 0)
        windows = 1 + (extra + stride - 1) // stride
    else:
        windows = np.ones_like(lengths)
    return windows * (window + (window * window) // ATTN_SCALE)


def assign_shards(
    lengths: Sequence[int] | np.ndarray,
    shards: int,
    max_residues: int,
    *,
    long_sequences: str = "truncate",
    window_overlap: int = 0,
) -> np.ndarray:
    """Shard of each sequence (int32), balancing estimated cost deterministically.

    Longest-processing-time greedy: sequences by decreasing cost (ties: input order) each go
    to the least-loaded shard (ties: the lowest shard number). Uses min(shards, n) shards,
    each of which receives at least one sequence. At most 4/3 of the optimum makespan, and in
    practice within one sequence's cost of the mean.
    """
    costs = sequence_costs(
        lengths, max_residues, long_sequences=long_sequences, window_overlap=window_overlap
    )
    n = len(costs)
    k = max(1, min(shards, n))
    result = np.zeros(n, dtype=np.int32)
    if k == 1:
        return result
    order = np.argsort(-costs, kind="stable")
    heap = [(0, s) for s in range(k)]
    for i, cost in zip(order.tolist(), costs[order].tolist(), strict=True):
        load, shard = heap[0]
        result[i] = shard
        heapq.heapreplace(heap, (load + cost, shard))
    return result


def shard_totals(assignment: np.ndarray, values: np.ndarray, shards: int) -> np.ndarray:
    """Sum of ``values`` per shard."""
    return np.bincount(assignment, weights=values, minlength=shards).astype(np.int64)


# --- pass 1: scan ----------------------------------------------------------------------------


@dataclass
class _Scan:
    lengths: array  # uint32 per sequence
    id_hashes: array  # int64 per sequence
    fingerprint: str
    nucleotides: int = 0  # residues that are A/C/G/T/N/U (DNA given to a protein model?)
    truncated: list[str] | None = None  # ids longer than maxResidues, when truncating


_NOT_NUCLEOTIDE = str.maketrans("", "", "ACGTNU")


def _records(uris: Sequence[str], storage: StorageSpec, alphabet: Alphabet) -> Iterator[Record]:
    for uri in uris:
        yield from _records_of(uri, storage, alphabet)


def _records_of(uri: str, storage: StorageSpec, alphabet: Alphabet) -> Iterator[Record]:
    try:
        stream = open_uri(uri, storage)
    except ObjectNotFound:
        raise InputError(f"input {uri} not found — check input.uri") from None
    with stream:
        yield from read_fasta(stream, uri, alphabet)


def _digest_update(digest: Any, record: Record) -> None:
    digest.update(record.id.encode() + b"\n" + record.seq.encode() + b"\n")


def _scan(uris: Sequence[str], storage: StorageSpec, alphabet: Alphabet,
          truncate_above: int | None = None) -> _Scan:
    lengths, hashes = array("I"), array("q")
    digest = hashlib.sha256()
    nucleotides, truncated = 0, []
    for record in _records(uris, storage, alphabet):
        n = len(record.seq)
        lengths.append(n)
        hashes.append(hash(record.id))  # within this process only: a duplicate pre-filter
        _digest_update(digest, record)
        nucleotides += n - len(record.seq.translate(_NOT_NUCLEOTIDE))
        if truncate_above is not None and n > truncate_above:
            truncated.append(record.id)
    return _Scan(lengths, hashes, f"sha256:{digest.hexdigest()}", nucleotides, truncated)


def _check_duplicates(scan: _Scan, uris: Sequence[str], storage: StorageSpec,
                      alphabet: Alphabet) -> None:  # fmt: skip
    hashes = np.frombuffer(scan.id_hashes, dtype=np.int64)
    values, counts = np.unique(hashes, return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if suspects:
        _locate_duplicate(uris, storage, alphabet, suspects)


def _locate_duplicate(uris: Sequence[str], storage: StorageSpec, alphabet: Alphabet,
                      suspects: set[int]) -> None:  # fmt: skip
    """Read again, remembering only ids whose hash collided, and name the first duplicate."""
    first: dict[str, tuple[str, int]] = {}
    for uri in uris:
        for number, record in enumerate(_records_of(uri, storage, alphabet), start=1):
            if hash(record.id) not in suspects:
                continue
            if record.id in first:
                where, at = first[record.id]
                raise InputError(
                    f"duplicate id {record.id!r}: record {at} of {where} and record {number} "
                    f"of {uri} — ids must be unique; rename or remove one"
                )
            first[record.id] = (uri, number)


# --- pass 2: write ---------------------------------------------------------------------------


class _ShardFiles:
    """Per-shard local files behind bounded in-memory buffers (flat memory, few open files)."""

    def __init__(self, directory: Path, shards: int, limit: int = _BUFFER_BYTES) -> None:
        self.limit = limit
        self.paths = [directory / f"{s:05d}.fa" for s in range(shards)]
        self.buffers: dict[int, list[bytes]] = {}
        self.sizes: dict[int, int] = {}
        self.buffered = 0

    def add(self, shard: int, record: Record) -> None:
        data = b">" + record.id.encode() + b"\n" + record.seq.encode("ascii") + b"\n"
        self.buffers.setdefault(shard, []).append(data)
        self.sizes[shard] = self.sizes.get(shard, 0) + len(data)
        self.buffered += len(data)
        if self.buffered > self.limit:
            self._flush(keep=self.limit // 2)

    def close(self) -> None:
        self._flush(keep=0)

    def _flush(self, keep: int) -> None:
        """Write the largest buffers until at most ``keep`` bytes stay buffered."""
        for shard in sorted(self.sizes, key=lambda s: (-self.sizes[s], s)):
            if self.buffered <= keep:
                break
            with open(self.paths[shard], "ab") as f:
                f.writelines(self.buffers.pop(shard))
            self.buffered -= self.sizes.pop(shard)


def _write_shards(
    uris: Sequence[str],
    storage: StorageSpec,
    alphabet: Alphabet,
    assignment: np.ndarray,
    shards: int,
    fingerprint: str,
    out: Store,
) -> None:
    with tempfile.TemporaryDirectory(prefix="embedjob-index-") as tmp:
        files = _ShardFiles(Path(tmp), shards)
        digest = hashlib.sha256()
        count = 0
        for record in _records(uris, storage, alphabet):
            if count < len(assignment):  # more records than in pass 1: caught below
                files.add(int(assignment[count]), record)
            _digest_update(digest, record)
            count += 1
        files.close()
        if count != len(assignment) or f"sha256:{digest.hexdigest()}" != fingerprint:
            raise InputError(
                f"input {', '.join(uris)} changed while it was being indexed — keep the input "
                "unchanged until the job has finished, then run it again"
            )
        _upload_all(out, files.paths)


def _upload_all(out: Store, paths: Sequence[Path]) -> None:
    with ThreadPoolExecutor(max_workers=min(_UPLOAD_THREADS, len(paths))) as pool:
        futures = [
            pool.submit(out.upload_file, layout.shard_input(s), str(p)) for s, p in enumerate(paths)
        ]
        for future in futures:
            future.result()


# --- the step --------------------------------------------------------------------------------


def _wanted_settings(spec: EmbeddingJobSpec, alphabet: Alphabet) -> dict[str, Any]:
    model = spec.model
    return {
        "model": model.name,
        "layer": model.canonical_layer,
        "pooling": model.pooling,
        "alphabet": alphabet.name,
        "shards": spec.shards,
        "longSequences": model.long_sequences,
        "maxResidues": model.max_residues,
        "windowOverlap": model.window_overlap if model.long_sequences == "window" else 0,
        "dtype": spec.output.dtype,
        "weights": weights_identity(model, spec.storage),
    }


def _check_model(spec: EmbeddingJobSpec) -> None:
    """What the worker would refuse only after loading: say it before any worker starts."""
    model = spec.model
    esm2 = model.is_esm2 or model.name.lower().startswith("esm2_")  # the loader's own test
    if model.weights == "random" and not esm2:
        raise ConfigError(
            f"model.weights: random is for ESM-2 models only ({model.name} is loaded as a "
            "Hugging Face model): give a Hugging Face snapshot, or remove model.weights"
        )


def _refuse(out: Store, differences: str) -> ConfigError:
    return ConfigError(
        f"output {out.uri} already holds a job for a different input/model ({differences}): "
        "choose a new output.uri or delete it"
    )


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v)


def _check_existing(out: Store, existing: IndexSummary, wanted: dict[str, Any],
                    fingerprint: str | None) -> IndexSummary:  # fmt: skip
    if not existing.weights:  # indexed before the weights were recorded: nothing to compare
        wanted = {k: v for k, v in wanted.items() if k != "weights"}
    diff = _settings_diff(existing.settings(), wanted)
    if diff:
        raise _refuse(out, diff)
    if fingerprint is not None and existing.fingerprint != fingerprint:
        raise _refuse(out, f"input fingerprint {existing.fingerprint[:19]}… -> {fingerprint[:19]}…")
    return existing


def _summarise(spec: EmbeddingJobSpec, alphabet: Alphabet, scan: _Scan,
               assignment: np.ndarray, weights: str) -> IndexSummary:  # fmt: skip
    lengths = np.frombuffer(scan.lengths, dtype=np.uint32).astype(np.int64)
    shards = max(1, min(spec.shards, len(lengths)))
    return IndexSummary(
        shards=shards,
        sequences=len(lengths),
        residues=int(lengths.sum()),
        fingerprint=scan.fingerprint,
        model=spec.model.name,
        alphabet=alphabet.name,
        inputs=tuple(spec.input.all_uris),
        shard_sequences=tuple(np.bincount(assignment, minlength=shards).tolist()),
        shard_residues=tuple(shard_totals(assignment, lengths, shards).tolist()),
        max_length=int(lengths.max()),
        requested_shards=spec.shards,
        layer=spec.model.canonical_layer,
        pooling=spec.model.pooling,
        long_sequences=spec.model.long_sequences,
        max_residues=spec.model.max_residues,
        window_overlap=spec.model.window_overlap if spec.model.long_sequences == "window" else 0,
        dtype=spec.output.dtype,
        weights=weights,
        truncated=len(scan.truncated or ()),
    )


def run_index(spec: EmbeddingJobSpec, out: Store, *, job_name: str = "") -> IndexSummary:
    """Validate and shard the input; idempotent (a finished index is returned as it is).

    ``shards`` larger than the number of sequences is clamped to it (no empty shards); the
    effective count is ``summary.shards``, the requested one ``summary.requested_shards``.
    """
    alphabet = alphabet_for(spec)
    _check_model(spec)
    uris = spec.input.all_uris
    wanted = _wanted_settings(spec, alphabet)
    existing = load_summary(out)
    if existing is not None:  # refuse a different model at once, before reading any input
        _check_existing(out, existing, wanted, None)
    log.info("index %s: reading %s", job_name or out.uri, ", ".join(uris))
    model = spec.model
    scan = _scan(uris, spec.storage, alphabet,
                 model.max_residues if model.long_sequences == "truncate" else None)
    _check_duplicates(scan, uris, spec.storage, alphabet)
    check_fits(spec, alphabet, scan.nucleotides, sum(scan.lengths))
    if existing is not None:
        log.info("index %s: already done (%d shards)", job_name or out.uri, existing.shards)
        return _check_existing(out, existing, wanted, scan.fingerprint)
    lengths = np.frombuffer(scan.lengths, dtype=np.uint32)
    assignment = assign_shards(
        lengths,
        spec.shards,
        spec.model.max_residues,
        long_sequences=spec.model.long_sequences,
        window_overlap=spec.model.window_overlap,
    )
    summary = _summarise(spec, alphabet, scan, assignment, wanted["weights"])
    _write_shards(uris, spec.storage, alphabet, assignment, summary.shards, scan.fingerprint, out)
    if scan.truncated:  # before the summary: the summary's presence means the index is whole
        out.write_bytes(layout.TRUNCATED, json.dumps(scan.truncated).encode())
    if not out.create_bytes(layout.SUMMARY, summary.to_json()):
        # A concurrent index run (a restarted operator's second pod) finished first.
        other = load_summary(out)
        assert other is not None
        return _check_existing(out, other, wanted, scan.fingerprint)
    log.info(
        "index %s: %d sequences, %d residues, %d shards",
        job_name or out.uri,
        summary.sequences,
        summary.residues,
        summary.shards,
    )
    return summary
