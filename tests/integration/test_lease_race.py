"""The S3 lease of ``embedjob run`` under contention: many runner processes find the same stale
lease at the same moment (moto's server on loopback); exactly one takes it over, every other
one is refused with the one line that names the holder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from workerkit import REPO

from embedjob.local.lease import LEASE_KEY
from embedjob.store import open_store

CONTENDERS = 8
ROUNDS = 3

# One contender: open the store and warm its connection, say "ready", wait for "go", take the
# lease, say what happened on one line, then hold the lease until stdin closes.
CONTENDER = """
import json, os, sys
from embedjob.failures import EmbedjobError
from embedjob.local.lease import LEASE_KEY, Lease
from embedjob.spec import StorageSpec
from embedjob.store import open_store
store = open_store(sys.argv[1], StorageSpec(endpoint_url=sys.argv[2], region="us-east-1"))
store.exists(LEASE_KEY)
print("ready", flush=True)
sys.stdin.readline()
try:
    lease = Lease(store).acquire()
except EmbedjobError as err:
    print(json.dumps({"refused": str(err), "exit": err.exit_code}), flush=True)
    sys.exit(0)
print(json.dumps({"held": os.getpid()}), flush=True)
sys.stdin.read()
"""


def stale_lease(store) -> None:
    """The lease of a runner that died long ago."""
    doc = {"host": "gone", "pid": 1, "token": "dead", "since": 0, "expires": 0}
    store.write_bytes(LEASE_KEY, json.dumps(doc).encode())


def race(uri: str, endpoint: str) -> tuple[list[int], list[dict[str, object]]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, uri, endpoint], cwd=REPO,
                              env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(CONTENDERS)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # as close together as the pipes allow
            proc.stdin.write("go\n")
            proc.stdin.flush()
        answers = [json.loads(proc.stdout.readline()) for proc in procs]
        winners = [int(a["held"]) for a in answers if "held" in a]
        return winners, [a for a in answers if "refused" in a]
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            proc.wait(timeout=60)


def test_exactly_one_of_many_runners_takes_over_a_stale_lease(s3_bucket) -> None:
    uri = s3_bucket.uri("job/")
    store = open_store(uri, s3_bucket.storage)
    for _ in range(ROUNDS):
        stale_lease(store)
        started = time.time()
        winners, refusals = race(uri, s3_bucket.endpoint)
        assert len(winners) == 1, f"{len(winners)} runners hold the lease: {winners}"
        assert len(refusals) == CONTENDERS - 1
        for refusal in refusals:
            text = str(refusal["refused"])
            assert "\n" not in text and refusal["exit"] == 75
            assert re.search(rf"in use by another `embedjob run` \(pid {winners[0]} on ", text), \
                text
        holder = json.loads(store.read_bytes(LEASE_KEY))
        assert holder["pid"] == winners[0] and holder["expires"] > started
        # The winner exits without releasing; the next round makes its lease stale again.


def test_lease_writes_whose_reply_is_lost_still_hold_the_lease(s3_proxied) -> None:
    """A takeover or renewal PUT that S3 applied but whose response was dropped: botocore's
    retry gets 412 for the runner's own write; reading its token back, the runner keeps it.
    A read of the lease whose body is cut short is resumed, not an error."""
    from embedjob.local.lease import Lease

    store = open_store(s3_proxied.uri("job/"), s3_proxied.storage)
    stale_lease(store)
    s3_proxied.proxy.force("drop", method="PUT", contains=LEASE_KEY)
    s3_proxied.proxy.force("cut", method="GET", contains=LEASE_KEY)  # and a body cut short
    lease = Lease(store).acquire()
    s3_proxied.proxy.force("drop", method="PUT", contains=LEASE_KEY)
    lease._renewed = -1e9  # a renewal is due now
    lease.renew_if_due()
    assert s3_proxied.proxy.counts["drop"] == 2 and s3_proxied.proxy.counts["cut"] == 1
    assert json.loads(store.read_bytes(LEASE_KEY))["token"] == lease.token
    lease.release()
