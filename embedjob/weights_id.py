"""What the weights are: a short identity recorded in the index and the manifest.

Two runs into one output must use the same model, not just the same model name: the identity
is ``random:seed=0`` for ``model.weights: random``, ``sha256:…`` of a checkpoint file or
tarball (local or s3://), ``sha256:…`` over a snapshot directory's files (plus ``@revision``
when the directory is a Hugging Face cache snapshot), and for unset weights the hub name (plus
the cached revision when the Hugging Face cache knows it). Hashes are cached per file (path,
size, mtime; for S3 the ETag) under ``EMBEDJOB_CACHE``, so a re-run does not read the weights
again. Free of torch and numpy: the index step and the operator import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from embedjob.failures import ConfigError, StorageError
from embedjob.spec import RANDOM_WEIGHTS, ModelSpec, StorageSpec
from embedjob.store import local_path, open_uri, split_s3_uri

RANDOM_SEED = 0  # models/weights.py writes random checkpoints with this seed


def _cache_file() -> Path:
    root = Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob"))
    return root / "weights-sha256.json"


def _cached(key: str, compute: Callable[[], str]) -> str:
    """``compute()`` once per ``key`` (a file's path+size+mtime or an object's ETag)."""
    path = _cache_file()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key in table:
        return str(table[key])
    value = compute()
    table[key] = value
    try:  # a cache that cannot be written only costs a re-hash next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def _hash_stream(stream: object) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 22), b""):  # type: ignore[attr-defined]
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def compute() -> str:
        with open(path, "rb") as f:
            return _hash_stream(f)

    return _cached(key, compute)


def _s3_sha256(uri: str, storage: StorageSpec | None) -> str:
    from embedjob.store import S3Store

    bucket, key = split_s3_uri(uri)
    store = S3Store(bucket, "", storage)
    head = store._call("read", key, lambda: store._head(key))  # one HEAD, errors mapped
    if head is None:
        raise ConfigError(f"model.weights {uri} does not exist")
    tag = f"s3:{uri}:{head.get('ETag')}:{head.get('ContentLength')}"

    def compute() -> str:
        with open_uri(uri, storage) as f:
            return _hash_stream(f)

    return _cached(tag, compute)


def _dir_sha256(path: Path) -> str:
    """sha256 over (relative name, file sha256) of every file in a snapshot directory."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith("."):  # .cache/ and lock files are not the model
            continue
        digest.update(f"{rel}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _hub_revision(name: str) -> str | None:
    """The revision the Hugging Face cache resolves ``name`` to (refs/main), if cached."""
    if "/" not in name:
        return None
    root = Path(os.environ.get("HF_HUB_CACHE")
                or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    ref = root / f"models--{name.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def weights_identity(model: ModelSpec, storage: StorageSpec | None = None) -> str:
    """A one-word identity of the weights ``model`` loads; ConfigError if they are missing."""
    weights = model.weights
    if weights == RANDOM_WEIGHTS:
        return f"random:seed={RANDOM_SEED}"
    if weights is None:
        revision = _hub_revision(model.name)
        return f"hub:{model.name}" + (f"@{revision}" if revision else "")
    try:
        if weights.startswith("s3://"):
            return f"sha256:{_s3_sha256(weights, storage)}"
        path = local_path(weights)
        if path.is_dir():
            revision = path.name if path.parent.name == "snapshots" else None
            return f"sha256:{_dir_sha256(path)}" + (f"@{revision}" if revision else "")
        if path.is_file():
            return f"sha256:{file_sha256(path)}"
    except OSError as err:
        raise ConfigError(f"cannot read model.weights {weights}: {err.strerror}") from None
    except StorageError as err:
        raise ConfigError(f"cannot read model.weights {weights}: {err}") from None
    raise ConfigError(f"model.weights {weights} does not exist")
