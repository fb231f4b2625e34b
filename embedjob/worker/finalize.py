"""Finish a job: the job manifest from the shard manifests, and the optional merged file."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import h5py

from embedjob import layout
from embedjob.failures import ConfigError
from embedjob.logs import log
from embedjob.repair import (
    RERUN,
    DamagedOutput,
    h5_errors,
    open_h5,
    read_done,
    reset_shards,
    sha256_of,
    shard_problem,
)
from embedjob.spec import EmbeddingJobSpec
from embedjob.store import Store, open_store
from embedjob.summary import load_summary
from embedjob.worker.assemble import BLOCK_ROWS, sha256_file

MANIFEST_VERSION = 1
MAX_LISTED_TRUNCATED = 1000


def shard_manifests(store: Store, shards: int) -> list[dict[str, Any]]:
    """Every shard's done record, each checked against its file re-hashed now: a file
    deleted, truncated or changed since its worker published it is never listed as done."""
    missing = [k for k in range(shards) if not store.exists(layout.shard_done(k))]
    if missing:
        raise ConfigError(
            f"{len(missing)} shards are not finished (first: {missing[0]}): run their workers first"
        )
    records, damaged = [], []
    for k in range(shards):
        done = read_done(store, k) or {}
        problem = shard_problem(store, k, done, verify=False)
        if problem is None:
            sha, size = sha256_of(store, layout.shard_output(k))
            if sha != done["sha256"]:
                problem = f"shard {k}: {layout.shard_output(k)} sha256 {sha[:12]}… does not " \
                          "match its done record"
            done = {**done, "sha256": sha, "bytes": size}
        if problem:
            damaged.append((k, problem))
        records.append(done)
    if damaged:
        reset_shards(store, [k for k, _ in damaged])
        log("shards.damaged", shards=[k for k, _ in damaged], first=damaged[0][1])
        raise DamagedOutput(f"{len(damaged)} finished shards are damaged ({damaged[0][1]}); "
                            f"they were reset: {RERUN.replace(' it', ' them')}",
                            reset_shards=[k for k, _ in damaged])  # the operator re-runs them
    return records


def build_manifest(spec: EmbeddingJobSpec, summary: Any, shards: list[dict[str, Any]],
                   attrs: dict[str, Any], job: str) -> dict[str, Any]:
    """The job manifest (pure): what the output holds and how to check it."""
    return {
        "version": MANIFEST_VERSION,
        "job": job,
        "model": spec.model.name,
        "layer": attrs.get("layer"),
        "pooling": spec.model.pooling,
        "precision": attrs.get("precision"),
        "dtype": spec.output.dtype,
        "dim": shards[0]["dim"] if shards else None,
        "fingerprint": summary.fingerprint,
        "weights": summary.weights or None,  # sha256:…, random:seed=…, hub:name[@revision]
        "weightsSource": spec.model.weights,
        "sequences": sum(s["count"] for s in shards),
        "quarantined": [i for s in shards for i in s.get("quarantined", [])],
        "truncated": {"count": summary.truncated, "maxResidues": spec.model.max_residues,
                      "file": layout.TRUNCATED if summary.truncated else None, "ids": []},
        "merged": layout.MERGED if spec.output.merge else None,
        "shards": [
            {"shard": s["shard"], "file": layout.shard_output(s["shard"]), "count": s["count"],
             "sha256": s["sha256"], "bytes": s.get("bytes")}
            for s in shards
        ],
    }


def _first_attrs(store: Store, workdir: Path) -> dict[str, Any]:
    local = workdir / "first.h5"
    store.download_file(layout.shard_output(0), str(local))
    what = f"{store.uri}{layout.shard_output(0)}"
    with open_h5(local, what) as h5, h5_errors(what):
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in h5.attrs.items()}


def merge_shards(store: Store, manifest: dict[str, Any], attrs: dict[str, Any],
                 workdir: Path) -> str:
    """Stream every shard file into one HDF5 file, shard by shard, block by block."""
    total, dim = manifest["sequences"], manifest["dim"]
    out = workdir / "merged.h5"
    with h5py.File(out, "w") as merged:
        ids = merged.create_dataset("ids", shape=(total,), dtype=h5py.string_dtype("utf-8"))
        emb = merged.create_dataset("embeddings", shape=(total, dim), dtype=manifest["dtype"],
                                    chunks=(max(1, min(total, 1024)), dim) if total else None)
        row = 0
        for entry in manifest["shards"]:
            local = workdir / "shard.h5"
            store.download_file(entry["file"], str(local))
            what = f"{store.uri}{entry['file']}"
            with open_h5(local, what) as h5, h5_errors(what):
                n = len(h5["ids"])
                for lo in range(0, n, BLOCK_ROWS):
                    hi = min(n, lo + BLOCK_ROWS)
                    ids[row + lo : row + hi] = h5["ids"][lo:hi]
                    emb[row + lo : row + hi] = h5["embeddings"][lo:hi]
            row += n
            local.unlink()
        for key, value in attrs.items():
            if key != "shard":
                merged.attrs[key] = value
    store.upload_file(layout.MERGED, str(out))
    return sha256_file(out)


def finalize(spec: EmbeddingJobSpec, job: str = "") -> dict[str, Any]:
    """Write manifest.json (and embeddings.h5 when output.merge); idempotent.

    A finished job whose spec now asks for the merged file gets it (and a new manifest).
    """
    store = open_store(spec.output.uri, spec.storage)
    if store.exists(layout.MANIFEST):
        existing = json.loads(store.read_bytes(layout.MANIFEST))
        if existing.get("merged") or not spec.output.merge:
            return existing
    summary = load_summary(store)
    if summary is None:
        raise ConfigError(f"no index in {store.uri}: run `embedjob index` first")
    shards = shard_manifests(store, summary.shards)
    with tempfile.TemporaryDirectory(prefix="embedjob-finalize-") as tmp:
        attrs = _first_attrs(store, Path(tmp))
        manifest = build_manifest(spec, summary, shards, attrs, job)
        if summary.truncated:  # the first ids inline; all of them in index/truncated.json
            ids = json.loads(store.read_bytes(layout.TRUNCATED))
            manifest["truncated"]["ids"] = ids[:MAX_LISTED_TRUNCATED]
        if spec.output.merge:
            manifest["mergedSha256"] = merge_shards(store, manifest, attrs, Path(tmp))
    store.write_bytes(layout.MANIFEST, json.dumps(manifest, indent=1).encode())
    log("job.finalized", sequences=manifest["sequences"], shards=len(shards))
    return manifest
