"""``embedjob inspect``: what a job's output holds, and whether every file checks out."""

from __future__ import annotations

import json
from typing import Any

from embedjob import layout
from embedjob.failures import ConfigError
from embedjob.repair import DamagedOutput, h5_errors, open_h5, sha256_of
from embedjob.spec import StorageSpec
from embedjob.store import Store, open_store


def _check_h5(local: str, key: str, entry: dict[str, Any], manifest: dict[str, Any],
              seen: set[str]) -> list[str]:
    """Problems inside one shard file (rows, repeated ids, dtype); damage as DamagedOutput."""
    problems: list[str] = []
    with open_h5(local, key) as h5, h5_errors(key):
        ids = [i.decode() if isinstance(i, bytes) else i for i in h5["ids"][:]]
        if len(ids) != entry["count"] or h5["embeddings"].shape[0] != entry["count"]:
            problems.append(f"{key}: {len(ids)} rows, manifest says {entry['count']}")
        if len(set(ids)) != len(ids):
            problems.append(f"{key}: {len(ids) - len(set(ids))} ids appear twice")
        if str(h5["embeddings"].dtype) != manifest["dtype"]:
            problems.append(f"{key}: dtype {h5['embeddings'].dtype}, manifest says "
                            f"{manifest['dtype']}")
        repeated = seen.intersection(ids)
        if repeated:
            problems.append(f"{key}: {len(repeated)} ids appear in another shard too")
        seen.update(ids)
    return problems


def verify_files(store: Store, manifest: dict[str, Any]) -> list[str]:
    """Problems found: a missing file, a checksum or count that disagrees, a repeated id."""
    import tempfile

    problems: list[str] = []
    seen: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="embedjob-verify-") as tmp:
        for entry in manifest["shards"]:
            key = entry["file"]
            if not store.exists(key):
                problems.append(f"{key}: missing")
                continue
            sha, _ = sha256_of(store, key)
            if sha != entry["sha256"]:
                problems.append(f"{key}: sha256 {sha[:12]}… does not match the manifest")
                continue
            local = f"{tmp}/shard.h5"
            store.download_file(key, local)
            try:
                problems.extend(_check_h5(local, key, entry, manifest, seen))
            except DamagedOutput as err:
                problems.append(str(err))
    merged = manifest.get("merged")
    if merged:
        if not store.exists(merged):
            problems.append(f"{merged}: missing")
        elif (sha := sha256_of(store, merged)[0]) != manifest.get("mergedSha256"):
            problems.append(f"{merged}: sha256 {sha[:12]}… does not match the manifest")
    return problems


def inspect_output(uri: str, *, verify: bool = False,
                   endpoint_url: str | None = None) -> tuple[dict[str, Any], bool]:
    store = open_store(uri, StorageSpec(endpoint_url=endpoint_url))
    if not store.exists(layout.MANIFEST):
        if store.exists(layout.STATUS):
            status = json.loads(store.read_bytes(layout.STATUS))
            p = status.get("progress", {})
            text = (f"{uri}: not finished — phase {status.get('phase')}, "
                    f"{p.get('done', 0)}/{p.get('total', 0)} sequences, "
                    f"shards done {status.get('shardsDone') or 'none'}")
            return {"text": text, "status": status}, False
        if store.exists(layout.SUMMARY):
            text = f"{uri}: indexed, not finished (no status.json yet: run the job)"
            return {"text": text}, False
        raise ConfigError(f"{uri} holds no embedjob output (no manifest.json or status.json)")
    manifest = json.loads(store.read_bytes(layout.MANIFEST))
    lines = [
        f"{uri}",
        f"  model {manifest['model']} layer {manifest['layer']} pooling {manifest['pooling']} "
        f"precision {manifest['precision']} dtype {manifest['dtype']} dim {manifest['dim']}",
        f"  {manifest['sequences']} sequences in {len(manifest['shards'])} shards"
        + (f", merged into {manifest['merged']}" if manifest.get("merged") else ""),
    ]
    if manifest.get("quarantined"):
        lines.append(f"  quarantined (left out): {', '.join(manifest['quarantined'][:10])}")
    report: dict[str, Any] = {"manifest": manifest}
    ok = True
    if verify:
        problems = verify_files(store, manifest)
        report["problems"] = problems
        ok = not problems
        lines.append("  verified: every file matches the manifest" if ok else "  PROBLEMS:")
        lines.extend(f"    {p}" for p in problems)
    report["text"] = "\n".join(lines)
    return report, ok
