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

ROLLUP_PENDING = Gauge("filestore_rollup_pending_deltas", "Rollup deltas not folded yet")
ROLLUP_LAG = Gauge("filestore_rollup_lag_seconds", "Age of the oldest rollup delta not folded yet")
ROLLUP_FOLDED = Counter("filestore_rollup_deltas_folded_total", "Directory rows changed by folds")
ROLLUP_RECALC_SECONDS = Histogram(
    "filestore_rollup_recalculation_seconds", "Latency of subtree rollup recalculations",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
CACHE_REQUESTS = Counter("filestore_cache_requests_total", "Directory summary cache lookups", ["result"])
# -- the event relay (core.relay) --------------------------------------------------------
RELAY_EVENTS = Counter("filestore_relay_events_total", "Events published by the relay", ["stream"])
RELAY_FAILURES = Counter("filestore_relay_failures_total", "Relay batches that failed and will be retried", ["stage"])
RELAY_BATCH_SECONDS = Histogram("filestore_relay_publish_seconds", "Time to publish one relay batch",
                                buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
RELAY_LAG_SECONDS = Gauge("filestore_relay_lag_seconds",
                          "Age of the last journal row published when it was published")
