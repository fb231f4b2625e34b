"""Every name the operator puts on the cluster: labels, annotations, the steps' roles.

One place, so that the pods it builds, the index it keeps of them and the views it reads
back agree (and the tests can name the same things).
"""

from __future__ import annotations

from embedjob.spec import API_GROUP

GROUP = API_GROUP
LABEL_JOB = f"{GROUP}/job"
LABEL_JOB_UID = f"{GROUP}/job-uid"
LABEL_SHARD = f"{GROUP}/shard"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_ROLE = f"{GROUP}/role"
ANN_HISTORY = f"{GROUP}/history"
"""The policy history an attempt started with (JSON): survives an operator restart."""
ANN_START_DONE = f"{GROUP}/start-done"
"""Sequences committed when the attempt started: did it make progress?"""
ANN_LAST_FAILURE = f"{GROUP}/last-failure"
FINALIZER = f"{GROUP}/finalizer"

ROLE_INDEX = "index"
ROLE_WORKER = "worker"
ROLE_FINALIZE = "finalize"
ROLES = (ROLE_INDEX, ROLE_WORKER, ROLE_FINALIZE)
