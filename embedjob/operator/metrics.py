"""Prometheus metrics of the operator (served on settings.metricsPort)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

JOBS = Gauge("embedjob_jobs", "EmbeddingJobs by phase", ["phase"])
SHARDS = Gauge("embedjob_shards", "Shards by state (all jobs)", ["state"])
RETRIES = Counter("embedjob_retries_total", "Retry decisions by failure type", ["failure_type"])
FAILED_SHARDS = Counter("embedjob_shards_failed_total", "Shards given up, by failure type",
                        ["failure_type"])
PODS_CREATED = Counter("embedjob_pods_created_total", "Pods created", ["role"])
RECONCILE_SECONDS = Histogram(
    "embedjob_reconcile_duration_seconds", "Time of one reconcile pass (pure part + apply)",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_PASS_SECONDS = Histogram(
    "embedjob_reconcile_pass_cpu_seconds",
    "CPU time of one pure reconcile pass (observe, decide, plan, status diff), off the loop",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EVENT_LOOP_LAG = Histogram(
    "embedjob_event_loop_lag_seconds",
    "How late a 50 ms sleep on the operator's event loop wakes (time the loop was blocked)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EVENT_LOOP_LAG_MAX = Gauge(
    "embedjob_event_loop_lag_max_seconds", "Longest event-loop lag seen since the start"
)
EVENT_LOOP_LAG_MAX_CPU_WAIT = Gauge(
    "embedjob_event_loop_lag_max_cpu_wait_seconds",
    "Of the longest event-loop lag, the time the loop's thread waited for a CPU (runnable, "
    "not running: other work on the node, or the pod's CPU limit)",
)
EVENT_LOOP_BLOCK_MAX = Gauge(
    "embedjob_event_loop_block_max_seconds",
    "Longest event-loop lag less the loop thread's wait for a CPU in it: what held the loop "
    "in the operator (its callbacks, the GIL, a collection)",
)
PREEMPTED_GPU_SECONDS = Counter(
    "embedjob_preemption_gpu_seconds_lost_total",
    "GPU-seconds of work since the last committed part, lost to preemptions (estimate)",
)

STORAGE_REQUESTS = Counter(
    "embedjob_storage_requests_total",
    "The operator's own storage reads, by kind (heartbeat, progress, index) and outcome "
    "(ok, missing, error, refused: not read, the job's identity does not allow it)",
    ["kind", "outcome"],
)
STORAGE_BUDGET = Gauge("embedjob_storage_budget_requests_per_minute",
                       "The configured budget of storage reads (storageRequestsPerMinute)")
STORAGE_PLANNED = Gauge("embedjob_storage_budget_in_use_requests_per_minute",
                        "Storage reads a minute the running shards take at the current interval")
READ_INTERVAL = Gauge("embedjob_shard_read_interval_seconds",
                      "Seconds between two reads of one running shard's heartbeat")
READ_SHARDS = Gauge("embedjob_shards_read", "Running shards whose heartbeat the operator reads")


def set_read_schedule(interval: float, planned_per_minute: float, shards: int) -> None:
    READ_INTERVAL.set(interval)
    STORAGE_PLANNED.set(planned_per_minute)
    READ_SHARDS.set(shards)


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def loop_lag(lag: float, worst: float, worst_cpu_wait: float, worst_own: float) -> None:
    EVENT_LOOP_LAG.observe(lag)
    EVENT_LOOP_LAG_MAX.set(worst)
    EVENT_LOOP_LAG_MAX_CPU_WAIT.set(worst_cpu_wait)
    EVENT_LOOP_BLOCK_MAX.set(worst_own)


def set_job_phases(phases: dict[str, str]) -> None:
    """phases: job uid -> phase; the gauge is recomputed, not incremented (restarts)."""
    counts: dict[str, int] = {}
    for phase in phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase in ("Pending", "Indexing", "Running", "Merging", "Succeeded", "Failed",
                  "Suspended"):
        JOBS.labels(phase=phase).set(counts.get(phase, 0))


def set_shard_states(states: dict[str, dict[str, int]]) -> None:
    """states: job uid -> {state: count}."""
    total: dict[str, int] = {}
    for per_job in states.values():
        for state, n in per_job.items():
            total[state] = total.get(state, 0) + n
    for state in ("Pending", "Running", "Backoff", "Succeeded", "Failed"):
        SHARDS.labels(state=state).set(total.get(state, 0))
