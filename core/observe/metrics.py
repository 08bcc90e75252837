"""Prometheus metrics, defined in one place so every layer labels them the same way."""
from prometheus_client import Counter, Gauge, Histogram

COMMAND_SECONDS = Histogram(
    "filestore_command_seconds", "Latency of orchestrator commands", ["command", "backend", "outcome"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
TXN_SECONDS = Histogram(
    "filestore_transaction_seconds", "Latency of database transactions", ["label"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1),
)
TXN_RESTARTS = Counter("filestore_transaction_restarts_total", "Transactions retried", ["label"])
EXECUTOR_OUTCOMES = Counter(
    "filestore_executor_outcomes_total", "Physical operations by outcome", ["backend", "operation", "outcome"])
BYTES_WRITTEN = Counter("filestore_bytes_written_total", "Bytes committed by write commands", ["backend"])
FUSE_ERRORS = Counter("filestore_fuse_unexpected_errors_total", "Handler exceptions answered with EIO", ["op"])
ACCESS_DENIED = Counter("filestore_access_denied_total", "Operations refused by an access policy (D42)",
                        ["backend", "op"])
FUSE_REQUESTS = Counter("filestore_fuse_requests_total", "Requests the kernel sent the mount, by opcode", ["op"])
# -- the commit pipeline (core.journal.pipeline) -------------------------------------------------
COMMIT_BACKLOG = Gauge("filestore_commit_backlog", "Answered commands not committed yet")
COMMIT_DELAY = Histogram(
    "filestore_commit_delay_seconds", "From a command's answer to its group's commit",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 30))
COMMIT_GROUP_SIZE = Histogram("filestore_commit_group_commands", "Commands recorded by one group commit",
                              buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500))
COMMIT_WAITS = Counter("filestore_commit_backpressure_waits_total",
                       "Commands that waited because the backlog was at its bound")

ROLLUP_PENDING = Gauge("filestore_rollup_pending_deltas", "Rollup deltas not folded yet")
ROLLUP_LAG = Gauge("filestore_rollup_lag_seconds", "Age of the oldest rollup delta not folded yet")
ROLLUP_FOLDED = Counter("filestore_rollup_deltas_folded_total", "Directory rows changed by folds")
ROLLUP_RECALC_SECONDS = Histogram(
    "filestore_rollup_recalculation_seconds", "Latency of subtree rollup recalculations",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
CACHE_REQUESTS = Counter("filestore_cache_requests_total", "Directory summary cache lookups", ["result"])
# -- the event relay (core.events.relay) --------------------------------------------------------
RELAY_EVENTS = Counter("filestore_relay_events_total", "Events published by the relay", ["stream"])
RELAY_FAILURES = Counter("filestore_relay_failures_total", "Relay batches that failed and will be retried", ["stage"])
RELAY_BATCH_SECONDS = Histogram("filestore_relay_publish_seconds", "Time to publish one relay batch",
                                buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
RELAY_LAG_SECONDS = Gauge("filestore_relay_lag_seconds",
                          "Age of the last journal row published when it was published")
# -- sidecar: watchers, queues, reconciler (issue 7) ------------------------------------------
WATCH_EVENTS = Counter("filestore_watch_events_total", "File system events seen by the watchers", ["backend"])
DRIFT_EVENTS = Counter("filestore_drift_events_total", "Changes made outside Filestore, journaled as drift",
                       ["backend", "source"])
RECONCILED = Counter("filestore_reconciled_total", "Paths reconciled, by outcome", ["backend", "outcome"])
JOBS = Counter("filestore_jobs_total", "Jobs run, by queue and outcome (done, busy, failed, parked)",
               ["queue", "outcome"])
JOB_SECONDS = Histogram("filestore_job_seconds", "Time to run one job", ["queue"],
                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
QUEUE_DEPTH = Gauge("filestore_queue_depth", "Jobs waiting, per queue", ["queue"])
QUEUE_RUNNING = Gauge("filestore_queue_running", "Jobs leased to a worker, per queue", ["queue"])
QUEUE_FAILED = Gauge("filestore_queue_failed", "Jobs parked after their last attempt, per queue", ["queue"])
QUEUE_AGE = Gauge("filestore_queue_oldest_age_seconds", "Age of the oldest unfinished job, per queue", ["queue"])
RECONCILE_BACKLOG = Gauge("filestore_reconcile_backlog", "Reconcile jobs waiting or running")


def refresh_queue_gauges(stats: dict) -> None:
    for queue, s in stats.items():
        QUEUE_DEPTH.labels(queue).set(s["depth"])
        QUEUE_RUNNING.labels(queue).set(s["running"])
        QUEUE_FAILED.labels(queue).set(s["failed"])
        QUEUE_AGE.labels(queue).set(s["oldest_age_seconds"])
    r = stats.get("filestore_reconcile_queue")
    if r is not None:
        RECONCILE_BACKLOG.set(r["depth"] + r["running"])


_BOUND: dict[tuple, object] = {}


def bound(metric, *labels: str):
    """metric.labels(*labels), remembered: `labels()` takes a lock and builds a key on every
    call, which on a command's path cost more than the measurement itself."""
    key = (id(metric), labels)
    child = _BOUND.get(key)
    if child is None:
        child = _BOUND[key] = metric.labels(*labels)
    return child
