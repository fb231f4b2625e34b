"""What crosses the pipe between the operator's pod informer
(:mod:`embedjob.operator.informer`) and its child process (:mod:`embedjob.operator.pod_watch`).

Plain picklable data, and nothing heavy to import: the child neither loads the Kubernetes
client nor the operator, so it stays small (the operator's pod peaks with its children)."""

from __future__ import annotations

from dataclasses import dataclass

from embedjob.operator.views import PodView

Key = tuple[str, str]
"""(namespace, pod name)."""


@dataclass(frozen=True)
class Change:
    """One pod as the watch shows it now; ``view`` None: deleted (or no longer ours)."""

    key: Key
    uid: str
    view: PodView | None


@dataclass(frozen=True)
class Batch:
    """Pods of one scope as the child read them: a list page (``page``), whose last one
    carries the keys the whole list saw (``listed``), or watch events."""

    scope: str | None
    changes: list[Change]
    listed: set[Key] | None
    page: bool = False


@dataclass(frozen=True)
class Expiry:
    """A scope's watch expired (410 Gone): a new list follows."""

    scope: str | None


Sent = Batch | Expiry
"""What the child sends, a list of them per message."""


@dataclass(frozen=True)
class ApiAccess:
    """How the child reaches the API server, as the operator's client configuration says
    (in-cluster or kubeconfig, loaded by the operator); the bearer token comes apart
    (:class:`Token`), since it is refreshed."""

    host: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool
    server_name: str | None
    proxy: str | None
    connect_timeout: float
    read_timeout: float


@dataclass(frozen=True)
class Token:
    """The Authorization header's value, sent first and again whenever it changes."""

    value: str | None


@dataclass(frozen=True)
class WatchPlan:
    """What the child watches: sent to it first."""

    scopes: list[str | None]
    page_size: int
    watch_seconds: int
    resume_from: str | None
    access: ApiAccess
