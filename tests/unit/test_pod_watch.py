"""What the pod watch child sends (embedjob/operator/pod_watch.py): the reduced pods of a
burst in few messages, none over CHANGES_PER_MESSAGE. The list+watch itself runs against the
real API server in tests/kube/test_informer.py."""

from __future__ import annotations

import queue
import threading
from multiprocessing import Pipe

from embedjob.operator.names import (
    LABEL_ATTEMPT,
    LABEL_JOB_UID,
    LABEL_ROLE,
    LABEL_SHARD,
    ROLE_WORKER,
)
from embedjob.operator.pod_watch import CHANGES_PER_MESSAGE, change_of, forward
from embedjob.operator.pod_wire import Batch, Change, Expiry, Sent


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
