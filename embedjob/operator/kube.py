"""Every Kubernetes API call the operator makes (besides kopf's own), in one place.

Each call here is covered by a rule in :mod:`embedjob.operator.rbac`. The official client
is synchronous; calls run in worker threads so the event loop keeps serving other jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from embedjob.failures import ConfigError
from embedjob.operator.reconcile import Event
from embedjob.operator.views import JobView
from embedjob.spec import API_GROUP, API_VERSION, KIND, PLURAL

log = logging.getLogger("embedjob.operator.kube")
_api: client.ApiClient | None = None
POOL_SIZE = 16
_POOL = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="embedjob-api")
"""Own threads for API calls: asyncio's default pool has only cpus + 4 of them."""


CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 30.0
"""Every call has a limit: a half-open connection or a stalled API server costs one call at
most this long, then the job's loop retries (the server's own limit is 60 s)."""
REQUEST_TIMEOUT = (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
WATCH_CLIENT_TIMEOUT_SECONDS = 330.0
"""kopf's watch streams: longer than the server-side timeout (300 s) that ends them
normally, so only a watch that went silent is cut."""


class ApiUnreachable(ConnectionError):
    """The API server did not answer (timeout, refused or reset connection, TLS error).

    An OSError, so the job loop's handler for API hiccups logs it and retries after a short
    pause instead of leaving the daemon to kopf's backoff."""


def unreachable(what: str, err: urllib3.exceptions.HTTPError) -> ApiUnreachable:
    """One line: what was called and urllib3's innermost reason, without the pool's repr."""
    reason = getattr(err, "reason", None) or err
    text = str(reason).split(": ", 1)[-1] if isinstance(reason, Exception) else str(reason)
    return ApiUnreachable(
        f"Kubernetes API unreachable ({what}): {type(reason).__name__}: {text}; retrying")


async def _call(func: Any, *args: Any) -> None:
    """A write whose answer nobody reads: drained, never deserialized into the client's
    model classes (milliseconds of CPU per pod, 10^4 times in a big job's first minutes).
    Errors still raise ApiException with the server's words."""
    method = _unvalidated(func)

    def call() -> None:
        try:
            response = method(*args, _request_timeout=REQUEST_TIMEOUT, _preload_content=False)
            response.drain_conn()
            response.release_conn()
        except urllib3.exceptions.HTTPError as err:  # MaxRetryError, ProtocolError, timeouts
            raise unreachable(getattr(func, "__name__", "call"), err) from None

    return await asyncio.get_running_loop().run_in_executor(_POOL, call)


def _unvalidated(method: Any) -> Any:
    """The client's method without its argument validation: recent clients wrap each API
    method in pydantic's ``validate_call``, which turns a pod manifest into the client's
    model classes and back — over a third of the operator's CPU per create (py-spy, 10^4
    pods), holding the GIL the event loop needs. The API server validates the body anyway,
    and says what is wrong in one line."""
    raw = getattr(method, "raw_function", None)
    owner = getattr(method, "__self__", None)
    return functools.partial(raw, owner) if raw is not None and owner is not None else method


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
        conf = client.Configuration.get_default_copy()
        conf.connection_pool_maxsize = POOL_SIZE
        _api = client.ApiClient(conf)
        # The client loads an API class on its first use (0.2 s for CustomObjectsApi, 1-2 s
        # for CoreV1Api): here, before the event loop runs, not in its first status patch.
        for api_class in (client.CoreV1Api, client.CustomObjectsApi):
            api_class(_api)
    return _api


def reset() -> None:
    """Forget the client (tests point the operator at a new emulator)."""
    global _api
    _api = None


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


async def create_pod(namespace: str, manifest: dict[str, Any]) -> bool:
    """Create; False if it already exists (a repeated plan, an operator restart).
    Raises PodRefused when no retry can succeed."""
    try:
        await _call(
            client.CoreV1Api(connect()).create_namespaced_pod, namespace, manifest
        )
    except ApiException as err:
        if err.status == 409:
            return False
        if permanent(err):
            name = manifest.get("metadata", {}).get("name")
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
        await _call(client.CoreV1Api(connect()).delete_namespaced_pod, name, namespace)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


async def delete_job(namespace: str, name: str) -> bool:
    """Delete an EmbeddingJob (its pods follow by owner reference); False if already gone."""
    try:
        await _call(client.CustomObjectsApi(connect()).delete_namespaced_custom_object,
                    API_GROUP, API_VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


async def patch_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    """JSON merge patch of the status subresource."""
    await _call(
        client.CustomObjectsApi(connect()).patch_namespaced_custom_object_status,
        API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": patch},
    )


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
        await _call(
            client.CoreV1Api(connect()).create_namespaced_event, job.namespace, body
        )
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
