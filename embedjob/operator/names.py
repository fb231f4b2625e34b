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
ANN_RESTART = f"{GROUP}/restart"
"""Set to a new value on an EmbeddingJob: discard its output and start over (once per value)."""
ANN_RETRY_FAILED = f"{GROUP}/retry-failed"
"""Set to a new value on a Failed EmbeddingJob: re-run its failed shards with fresh budgets."""
REQUEST_ANNOTATIONS = (ANN_RESTART, ANN_RETRY_FAILED)
RESTART_ENV = "EMBEDJOB_RESTART"
"""Set (to the request's value) on index pods after a restart: the index step first deletes
the output's index, checkpoints and results (``embedjob run --restart``'s discard)."""

ROLE_INDEX = "index"
ROLE_WORKER = "worker"
ROLE_FINALIZE = "finalize"
ROLES = (ROLE_INDEX, ROLE_WORKER, ROLE_FINALIZE)
