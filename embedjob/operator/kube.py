"""Every Kubernetes API call the operator makes (besides kopf's own and the pod informer's),
in one place.

Each call here is covered by a rule in :mod:`embedjob.operator.rbac`. The writes go through
:mod:`embedjob.operator.rest` (aiohttp on the event loop); the official client loads the
credentials and still serves the storage reader's synchronous Secret read.
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import datetime, timezone
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from embedjob.failures import ConfigError
from embedjob.operator.reconcile import Event
from embedjob.operator.rest import (
    MERGE_PATCH,
    ApiUnreachable,
    Session,
    encode,
    path,
    unreachable,
)
from embedjob.operator.views import JobView
from embedjob.spec import API_GROUP, API_VERSION, KIND, PLURAL

log = logging.getLogger("embedjob.operator.kube")
_api: client.ApiClient | None = None
_session: Session | None = None
CONNECTIONS = 16
"""Connections to the API server for the operator's own writes, shared by all jobs."""


CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 30.0
"""Every call has a limit: a half-open connection or a stalled API server costs one call at
most this long, then the job's loop retries (the server's own limit is 60 s)."""
REQUEST_TIMEOUT = (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
WATCH_CLIENT_TIMEOUT_SECONDS = 330.0
"""kopf's watch streams: longer than the server-side timeout (300 s) that ends them
normally, so only a watch that went silent is cut."""
CUSTOM = ("apis", API_GROUP, API_VERSION)


def session() -> Session:
    """The running loop's session to the API server (made on first use in that loop)."""
    global _session
    if _session is None or not _session.usable():
        _session = Session(connect().configuration, CONNECTIONS,
                           CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
    return _session


async def close() -> None:
    """Close the session's connections (the operator's cleanup)."""
    global _session
    if _session is not None:
        await _session.close()
        _session = None


def kopf_timeouts(settings: Any) -> None:
    """The same limits on kopf's own requests (its watches and patches): call from the
    kopf startup handler with its ``settings``."""
    settings.networking.connect_timeout = CONNECT_TIMEOUT_SECONDS
    settings.networking.request_timeout = READ_TIMEOUT_SECONDS
    settings.watching.connect_timeout = CONNECT_TIMEOUT_SECONDS
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT_SECONDS


def connect() -> client.ApiClient:
    """In-cluster service account first, then the kubeconfig (local runs, tests)."""
    global _api
    if _api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as err:
                raise ConfigError(
                    f"no Kubernetes to connect to: not in a cluster, and no usable kubeconfig "
                    f"({str(err).splitlines()[0]}); set KUBECONFIG or run in a pod") from None
        _api = client.ApiClient(client.Configuration.get_default_copy())
        # The client loads CoreV1Api on its first use (1-2 s): here, before the event loop
        # runs, not in the pod informer's first list.
        client.CoreV1Api(_api)
    return _api


def reset() -> None:
    """Forget the client and the session (tests point the operator at a new server)."""
    global _api, _session
    _api = _session = None


EVENT_MESSAGE_BYTES = 1024
"""The API server refuses an Event (with eventTime) whose message has more bytes than this."""
PERMANENT = frozenset({400, 403, 404, 422})
"""Answers to a pod create that no retry can fix: the pod itself is invalid (400, 422), the
operator may not create it (403), the namespace is gone (404)."""


class PodRefused(Exception):
    """The API server refused a pod for good; the message carries the server's own words."""


def describe(err: ApiException) -> str:
    """``422 Unprocessable Entity: <the server's message>`` (the Status body's message, not
    the headers that ``str(err)`` starts with)."""
    message = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = str(json.loads(err.body or "").get("message", ""))
    if not message:
        message = (err.body or "").strip() if isinstance(err.body, str) else ""
    return f"{err.status} {err.reason}: {message}" if message else f"{err.status} {err.reason}"


TRANSIENT_403 = ("exceeded quota", "error looking up service account")
"""403s that heal by themselves: a full quota frees up when other pods end (Kubernetes' Job
controller retries it too); a new namespace's ServiceAccount appears within seconds."""


def permanent(err: ApiException) -> bool:
    body = err.body if isinstance(err.body, str) else ""
    return err.status in PERMANENT and not any(text in body for text in TRANSIENT_403)


async def create_pod(namespace: str, name: str, body: bytes) -> bool:
    """Create pod ``name`` from its encoded manifest (:func:`rest.encode`); False if it
    already exists (a repeated plan, an operator restart). Raises PodRefused when no retry
    can succeed."""
    try:
        await session().call("create pod", "POST",
                             path("api", "v1", "namespaces", namespace, "pods"), body)
    except ApiException as err:
        if err.status == 409:
            return False
        if permanent(err):
            raise PodRefused(f"the API server refused pod {name}: {describe(err)}") from None
        raise
    return True


def fit_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


async def delete_pod(namespace: str, name: str) -> bool:
    """Graceful delete (the pod's own grace period: the worker checkpoints on SIGTERM)."""
    try:
        await session().call("delete pod", "DELETE",
                             path("api", "v1", "namespaces", namespace, "pods", name))
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


async def delete_job(namespace: str, name: str) -> bool:
    """Delete an EmbeddingJob (its pods follow by owner reference); False if already gone."""
    try:
        await session().call("delete job", "DELETE",
                             path(*CUSTOM, "namespaces", namespace, PLURAL, name))
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


async def patch_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    """JSON merge patch of the status subresource."""
    await session().call("patch status", "PATCH",
                         path(*CUSTOM, "namespaces", namespace, PLURAL, name, "status"),
                         encode({"status": patch}), MERGE_PATCH)


async def post_event(job: JobView, event: Event) -> None:
    """An Event on the EmbeddingJob; failures to post are logged, never fatal."""
    now = datetime.now(timezone.utc)
    body = {
        "metadata": {"generateName": f"{job.name}.", "namespace": job.namespace},
        "involvedObject": {
            "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": job.name,
            "namespace": job.namespace, "uid": job.uid,
        },
        "type": event.type,
        "reason": event.reason,
        "message": fit_bytes(event.message, EVENT_MESSAGE_BYTES),
        "source": {"component": "embedjob-operator"},
        "reportingComponent": "embedjob-operator",
        "reportingInstance": "embedjob-operator",
        "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "action": event.reason,
        "count": 1,
    }
    try:
        await session().call("post event", "POST",
                             path("api", "v1", "namespaces", job.namespace, "events"),
                             encode(body))
    except (ApiException, ApiUnreachable) as err:
        text = describe(err) if isinstance(err, ApiException) else str(err)
        log.warning("could not post event %s on %s: %s", event.reason, job.name, text)


def read_secret_data(namespace: str, name: str) -> dict[str, str]:
    """A Secret's data (base64 values), for a job's own storage identity (storage_access).

    Synchronous: called from the storage reader threads, never on the event loop. Only the
    data is returned; nothing of it is logged (an error says the status code and reason)."""
    core = client.CoreV1Api(connect())
    try:
        secret = core.read_namespaced_secret(name, namespace, _request_timeout=REQUEST_TIMEOUT)
    except urllib3.exceptions.HTTPError as err:
        raise unreachable("read_namespaced_secret", err) from None
    return dict(secret.data or {})
