"""Why did an attempt stop? From the pod as Kubernetes reports it. Pure."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from embedjob.attempts import committed_by
from embedjob.failures import Failure, FailureType, TerminationMessage, classify_exit
from embedjob.operator.views import PodView, ShardProgress

PREEMPTION_REASONS = frozenset({"Evicted", "Shutdown", "NodeShutdown", "NodeLost",
                                "Terminated", "Preempting", "DeletionByTaintManager"})
ADMISSION_REASONS = frozenset({
    "UnexpectedAdmissionError", "NodeAffinity", "NodeName", "NodePorts", "InvalidNodeInfo",
    "UnknownReason", "UnexpectedPredicateFailureType", "PodOSNotSupported",
    "PodOSSelectorNodeLabelDoesNotMatch", "Taint", "TaintToleration",
})
"""Pod status reasons of a kubelet's admission refusal (besides ``OutOf<resource>``): the pod
was bound to a node that then refused to run it, e.g. a GPU node whose device plugin has not
registered its GPUs yet."""
DISK_WORDS = ("ephemeral-storage", "ephemeral storage", "ephemeral local storage",
              "EmptyDir volume")
"""Words of the kubelet's eviction messages about disk (its own limit, an emptyDir's
sizeLimit, or the node's disk pressure)."""


def classify(pod: PodView) -> Failure:
    """Classify a terminated pod (or one that vanished with its node)."""
    return classify_read(pod, TerminationMessage.from_json(pod.termination_message))


def classify_read(pod: PodView, message: TerminationMessage | None) -> Failure:
    """:func:`classify` with the termination message already read (it is read once, into
    :class:`embedjob.attempts.Ended`)."""
    if pod.container_reason == "OOMKilled":
        return Failure(FailureType.host_oom, "container OOMKilled (memory limit)", node=pod.node)
    refused = kubelet_refusal(pod)
    if refused is not None:  # before the message: an evicted worker says "preempted" too
        return refused
    if message is not None:
        return replace(classify_exit(pod.exit_code, message), node=pod.node)
    if pod.deleting and pod.exit_code == 137:
        # SIGKILL at the end of a deletion's grace period (a drain, a user, a short grace):
        # a stop, not the kernel's OOM killer, which the kubelet would report as OOMKilled.
        return Failure(FailureType.preempted, "killed after the deletion grace period",
                       node=pod.node)
    if pod.disruption or pod.pod_reason in PREEMPTION_REASONS:
        why = pod.disruption or pod.pod_reason or "disruption"
        text = f"{why}: {pod.pod_message}" if pod.pod_message else why
        return Failure(FailureType.preempted, text, node=pod.node)
    if pod.exit_code is None:
        text = pod.pod_message or pod.pod_reason or f"pod {pod.phase} without an exit code"
        return Failure(FailureType.generic, text, node=pod.node)
    failure = replace(classify_exit(pod.exit_code, None), node=pod.node)
    last = _last_line(pod.termination_message)
    return replace(failure, message=last) if last else failure


def kubelet_refusal(pod: PodView) -> Failure | None:
    """An admission refusal or an eviction for disk, from the pod's status reason/message."""
    reason = pod.pod_reason or ""
    lines = (pod.pod_message or "").strip().splitlines()
    text = f"{reason}: {lines[0][:500]}" if lines else reason
    if reason in ADMISSION_REASONS or reason.startswith("OutOf"):
        return Failure(FailureType.node_admission, text, node=pod.node)
    if reason == "Evicted" and any(w in (pod.pod_message or "") for w in DISK_WORDS):
        return Failure(FailureType.disk, text, node=pod.node)
    return None


def _last_line(text: str | None) -> str:
    """A plain-text termination message (FallbackToLogsOnError: the log's tail): its last
    line is the one-line error of an expected failure."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def vanished(pod_name: str | None) -> Failure:
    """The attempt's pod is gone (deleted with its node, or by someone else)."""
    return Failure(FailureType.preempted, f"pod {pod_name or '?'} disappeared")


def node_lost(pod: PodView, now: datetime) -> Failure | None:
    """A deleting pod that outlived its grace period (kubelet gone) counts as preempted."""
    if pod.terminated:
        return None
    if pod.phase == "Unknown":
        return Failure(FailureType.preempted, "pod phase Unknown (node lost)", node=pod.node)
    if pod.deleting and now > pod.deleting + timedelta(seconds=30):
        return Failure(FailureType.preempted, "pod deletion stalled (node lost)", node=pod.node)
    return None


def unschedulable(pod: PodView, now: datetime, after_seconds: float) -> Failure | None:
    if pod.phase != "Pending" or pod.unschedulable_since is None:
        return None
    waited = (now - pod.unschedulable_since).total_seconds()
    if waited < after_seconds:
        return None
    text = (pod.unschedulable_message or "no node fits").splitlines()[0]
    return Failure(FailureType.unschedulable, f"pending {int(waited)}s: {text}")


def made_progress(pod: PodView, progress: ShardProgress | None) -> bool:
    """Did this attempt commit anything new? progress.json or its last word."""
    message = TerminationMessage.from_json(pod.termination_message)
    return committed_by(message, progress.done if progress else 0) > pod.start_done


def quiet_until(pod: PodView, unschedulable_after: float) -> datetime | None:
    """The first moment :func:`node_lost` or :func:`unschedulable` could give a verdict on an
    active pod that has none now (same inputs); None: never. What lets a reconcile pass reuse
    the pod's earlier decision until then (operator.incremental). "Stuck" needs no time here:
    it changes only with a new heartbeat read, which is part of the memo's key."""
    times: list[datetime] = []
    if pod.deleting:
        times.append(pod.deleting + timedelta(seconds=30))
    if pod.phase == "Pending" and pod.unschedulable_since is not None:
        times.append(pod.unschedulable_since + timedelta(seconds=unschedulable_after))
    return min(times) if times else None
