"""The operator's own reads of a job's output, with an identity scoped to the job.

The operator reads a job's ``index/summary.json`` and its shards' heartbeats. With
its own identity it would read any URI at any endpoint a job names — a confused deputy
across namespaces. So it opens a job's store the way the job's workers do: the job's
endpoint and region (``spec.storage``, else ``workerDefaults.storage``) and the job's
credentials Secret, read from the job's own namespace. A job without a Secret (IRSA) is read
with the operator's own identity only when ``security.operatorStorageIdentity`` is
``allowOperatorIdentity``; otherwise nothing of it is read, and :class:`StorageRefused` says
why in one line. Credentials never leave this module: not in logs, Events or status.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from embedjob.failures import EmbedjobError
from embedjob.operator.config import OperatorSettings
from embedjob.operator.pods import AWS_KEYS, effective_spec
from embedjob.spec import EmbeddingJobSpec, StorageSpec
from embedjob.store import ObjectNotFound, Store, open_store, split_s3_uri
from embedjob.store_s3 import S3Store
from embedjob.store_s3 import _make_client as make_client

JOB_SECRET_ONLY = "jobSecretOnly"
ALLOW_OPERATOR_IDENTITY = "allowOperatorIdentity"
REOPEN_SECONDS = 300.0
"""A job's store is opened again (its Secret read again) this often: rotated keys apply."""
RETRY_SECONDS = 30.0
"""A Secret that could not be read (missing, the API away) is looked at again this soon."""

SecretReader = Callable[[str, str], Mapping[str, str]]
"""(namespace, name) -> the Secret's data, base64 as the API returns it."""


class StorageRefused(EmbedjobError):
    """The operator will not, or cannot, read this job's output (one line, no secrets).
    ``lasting``: the settings refuse it (no Secret, jobSecretOnly), not a Secret that may
    appear or an API that may come back."""

    lasting = False


@dataclass(frozen=True)
class JobStorage:
    """Where a job's output is and whose identity reads it."""

    namespace: str
    job: str
    uri: str
    storage: StorageSpec
    """Endpoint and region, the job's over the operator's defaults (as its workers get)."""

    @property
    def secret(self) -> str | None:
        return self.storage.credentials_secret


def job_storage(namespace: str, job: str, spec: EmbeddingJobSpec,
                settings: OperatorSettings) -> JobStorage:
    return JobStorage(namespace, job, spec.output.uri,
                      effective_spec(spec, settings).storage)


ClientMaker = Callable[[StorageSpec, Mapping[str, str | None]], Any]
"""(endpoint and region, credentials) -> an S3 client."""


def open_job_store(where: JobStorage, settings: OperatorSettings, read_secret: SecretReader,
                   clients: ClientMaker = make_client) -> Store:
    """The job's store as the operator may read it; StorageRefused when it may not."""
    if not where.uri.startswith("s3://"):
        # A path or file://: the operator's own filesystem (tests, one-node setups); in a
        # cluster the operator pod mounts no job volume, so nothing of another job is there.
        return open_store(where.uri, where.storage)
    if where.secret:
        return _secret_store(where, read_secret, clients)
    if settings.security.operator_storage_identity != ALLOW_OPERATOR_IDENTITY:
        raise _lasting(StorageRefused(
            f"the operator does not read {where.uri}: the job names no "
            "spec.storage.credentialsSecret (nor workerDefaults.storage.credentialsSecret), and "
            f"security.operatorStorageIdentity is {JOB_SECRET_ONLY} — progress stays unknown "
            "and stuck workers are not detected; name a Secret, or set it to "
            f"{ALLOW_OPERATOR_IDENTITY}"))
    return open_store(where.uri, where.storage)


def _lasting(err: StorageRefused) -> StorageRefused:
    err.lasting = True
    return err


def _secret_store(where: JobStorage, read_secret: SecretReader, clients: ClientMaker
                  ) -> Store:
    try:
        data = read_secret(where.namespace, str(where.secret))
    except Exception as err:  # the API's words, never the Secret's
        raise StorageRefused(f"cannot read Secret {where.namespace}/{where.secret} for "
                             f"{where.uri}: {_reason(err)}") from None
    keys = {k: base64.b64decode(v).decode() for k, v in (data or {}).items() if k in AWS_KEYS}
    if not keys.get(AWS_KEYS[0]) or not keys.get(AWS_KEYS[1]):
        raise StorageRefused(f"Secret {where.namespace}/{where.secret} has no "
                             f"{AWS_KEYS[0]} and {AWS_KEYS[1]}: the operator reads nothing of "
                             f"{where.uri}")
    client = clients(where.storage, {
        "aws_access_key_id": keys[AWS_KEYS[0]], "aws_secret_access_key": keys[AWS_KEYS[1]],
        "aws_session_token": keys.get(AWS_KEYS[2]) or None})
    bucket, prefix = split_s3_uri(where.uri)
    return JobS3Store(bucket, prefix, where.storage, client)


def _reason(err: Exception) -> str:
    status = getattr(err, "status", None)
    reason = getattr(err, "reason", None)
    if status:
        return f"{status} {reason or ''}".strip()
    return type(err).__name__


class JobS3Store(S3Store):
    """An S3Store whose client carries the job's credentials, not the environment's."""

    def __init__(self, bucket: str, prefix: str, storage: StorageSpec, client: Any) -> None:
        super().__init__(bucket, prefix, storage)
        self._client = client

    @property
    def client(self) -> Any:
        return self._client


class Stores:
    """Each job's store, opened once per :data:`REOPEN_SECONDS`; a refusal is kept as long
    (said once, not on every read). Thread-safe: the poller's readers share it."""

    def __init__(self, settings: OperatorSettings, read_secret: SecretReader,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.read_secret, self.clock = settings, read_secret, clock
        self._open: dict[str, tuple[float, JobStorage, Store | StorageRefused]] = {}
        self._clients: dict[tuple[str, tuple[tuple[str, str | None], ...]], Any] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, uid: str, where: JobStorage) -> Store:
        """The job's store, or StorageRefused (the same one until it is looked at again)."""
        opened = self._cached(uid, where)
        if opened is None:
            with self._opener(uid):  # the reader threads that want it at once read one Secret
                opened = self._cached(uid, where)
                if opened is None:
                    opened = self._open_now(uid, where)
        if isinstance(opened, StorageRefused):
            raise opened
        return opened

    def _cached(self, uid: str, where: JobStorage) -> Store | StorageRefused | None:
        with self._lock:
            cached = self._open.get(uid)
        if cached is None or cached[1] != where or self.clock() - cached[0] >= _keep(cached[2]):
            return None
        return cached[2]

    def _opener(self, uid: str) -> threading.Lock:
        with self._lock:
            return self._opening.setdefault(uid, threading.Lock())

    def _open_now(self, uid: str, where: JobStorage) -> Store | StorageRefused:
        try:
            opened: Store | StorageRefused = open_job_store(where, self.settings,
                                                            self.read_secret, self._client)
        except StorageRefused as err:
            opened = err
        except EmbedjobError as err:  # a malformed URI: one line too
            opened = StorageRefused(err.message)
        with self._lock:
            self._open[uid] = (self.clock(), where, opened)
        return opened

    def _client(self, storage: StorageSpec, credentials: Mapping[str, str | None]) -> Any:
        """One client per endpoint and identity: the jobs of a namespace that share a Secret
        share it (a boto3 client is ~0.35 MiB with its own connection pool: 100 jobs, 35 MiB).
        Clients no open store uses any more (a rotated key, jobs gone) are dropped."""
        key = (storage.model_dump_json(), tuple(sorted(credentials.items())))
        with self._lock:
            live = {id(s.client) for _, _, s in self._open.values() if isinstance(s, JobS3Store)}
            for old in [k for k, c in self._clients.items() if k != key and id(c) not in live]:
                del self._clients[old]
            client = self._clients.get(key)
        if client is None:
            client = make_client(storage, credentials)
            with self._lock:
                client = self._clients.setdefault(key, client)
        return client

    def read(self, uid: str, where: JobStorage, key: str) -> bytes:
        """One object of the job's output (ObjectNotFound, StorageError, StorageRefused)."""
        return self.get(uid, where).read_bytes(key)

    def read_tagged(self, uid: str, where: JobStorage, key: str) -> tuple[bytes, str]:
        """One object and its tag (ETag), so a later listing can tell whether it changed."""
        found = self.get(uid, where).read_tagged(key)
        if found is None:
            raise ObjectNotFound(f"not found: {where.uri}{key}")
        return found

    def listing(self, uid: str, where: JobStorage, prefix: str) -> dict[str, str]:
        """The keys under ``prefix`` with their tags (one request per 1,000 keys)."""
        return dict(self.get(uid, where).list_tagged(prefix))

    def forget(self, uid: str) -> None:
        with self._lock:
            self._open.pop(uid, None)
            self._opening.pop(uid, None)


class Reads(Protocol):
    """What reads a job's output for the operator: :class:`Stores` in this process, or
    :class:`~embedjob.operator.read_process.ReadProcess` in a child process."""

    def read(self, uid: str, where: JobStorage, key: str) -> bytes: ...

    def read_tagged(self, uid: str, where: JobStorage, key: str) -> tuple[bytes, str]: ...

    def listing(self, uid: str, where: JobStorage, prefix: str) -> dict[str, str]: ...

    def forget(self, uid: str) -> None: ...


def _keep(opened: Store | StorageRefused) -> float:
    """How long an opened store, or a refusal, stands before the next look."""
    if isinstance(opened, StorageRefused) and not opened.lasting:
        return RETRY_SECONDS
    return REOPEN_SECONDS
