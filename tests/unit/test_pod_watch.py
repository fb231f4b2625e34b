"""What crosses the pod watch's pipe (embedjob/operator/pod_watch.py, informer.py): the
reduced pods of a burst in few messages, none over CHANGES_PER_MESSAGE; each refreshed token.
The list+watch itself runs against the real API server in tests/kube/test_informer.py."""

from __future__ import annotations

import queue
import threading
from multiprocessing import Pipe

from kubernetes import client

from embedjob.operator.informer import send_tokens
from embedjob.operator.names import (
    LABEL_ATTEMPT,
    LABEL_JOB_UID,
    LABEL_ROLE,
    LABEL_SHARD,
    ROLE_WORKER,
)
from embedjob.operator.pod_watch import CHANGES_PER_MESSAGE, change_of, forward
from embedjob.operator.pod_wire import Batch, Change, Expiry, Sent, Token


def test_a_burst_goes_in_few_messages_of_bounded_size() -> None:
    items: queue.SimpleQueue[Sent] = queue.SimpleQueue()
    burst = 2 * CHANGES_PER_MESSAGE + 50
    for i in range(burst):
        items.put(Batch("ns", [Change(("ns", f"p{i}"), "u", None)], None))
    items.put(Expiry("ns"))
    received, sent = Pipe(duplex=False)
    threading.Thread(target=forward, args=(items, sent), daemon=True).start()
    messages: list[list[Sent]] = []
    while sum(len(m) for m in messages) < burst + 1:
        assert received.poll(10), "forward sent nothing"
        messages.append(received.recv())
    sizes = [sum(len(getattr(i, "changes", ())) for i in m) for m in messages]
    assert sizes == [CHANGES_PER_MESSAGE, CHANGES_PER_MESSAGE, 50]
    order = [c.key[1] for m in messages for i in m if isinstance(i, Batch) for c in i.changes]
    assert order == [f"p{i}" for i in range(burst)] and messages[-1][-1] == Expiry("ns")


def test_only_pods_with_the_job_label_are_ours() -> None:
    labels = {LABEL_JOB_UID: "u", LABEL_ROLE: ROLE_WORKER, LABEL_SHARD: "0", LABEL_ATTEMPT: "0"}
    ours = {"metadata": {"namespace": "ns", "name": "w-0-0", "labels": labels},
            "status": {"phase": "Running"}}
    change = change_of(ours)
    assert change is not None and change.key == ("ns", "w-0-0") and change.uid == "u"
    assert change.view is not None and change.view.phase == "Running"
    assert change_of({"metadata": {"namespace": "ns", "name": "other"}}) is None


def test_the_child_gets_each_new_token_the_configuration_refreshes_to() -> None:
    tokens = iter(["first", "first", "second", "second"])

    def refresh(conf: client.Configuration) -> None:  # what in-cluster config installs
        conf.api_key["authorization"] = next(tokens, "second")

    conf = client.Configuration()
    conf.api_key_prefix["authorization"] = "Bearer"
    conf.api_key["authorization"] = "stale"
    conf.refresh_api_key_hook = refresh
    received, sent = Pipe(duplex=False)
    ended = threading.Event()
    sender = threading.Thread(target=send_tokens, args=(conf, sent, ended, 0.01))
    sender.start()
    try:
        assert received.poll(10), "no new token sent"
        assert received.recv() == Token("Bearer second")
        assert not received.poll(0.1)  # unchanged since: nothing more
    finally:
        ended.set()
        sender.join()
