"""Prometheus metrics of the role processes (actors, workers, projector).

The edge keeps its own registry and serves it on `/metrics`; the other roles have no HTTP
server of their own, so `jetsource <role>` serves these (with the client library's process and
GC collectors) on `JETSOURCE_METRICS_PORT` when it is set. Everything here is counted per group
commit, per projected batch or per task, never per message on a hot path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

APPENDED_COMMANDS = Counter(
    "jetsource_appended_commands", "Commands whose events were stored", ["stream"])
APPEND_BATCHES = Counter(
    "jetsource_append_batches", "Atomic batches committed by the group commit", ["stream"])
APPEND_BATCH_MESSAGES = Histogram(
    "jetsource_append_batch_messages", "Messages per committed atomic batch", ["stream"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000))
APPEND_BATCH_SECONDS = Histogram(
    "jetsource_append_batch_seconds", "Time from sending an atomic batch to its acknowledgement", ["stream"],
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0))
APPEND_SPLITS = Counter(
    "jetsource_append_batch_splits", "Batches rejected (a stale writer, a repeated id) and retried per command",
    ["stream"])
COMMAND_ERRORS = Counter(
    "jetsource_command_errors", "Command and query requests answered with a coded error", ["subject", "code"])
PROJECTED_EVENTS = Counter(
    "jetsource_projected_events", "Events folded into a read model", ["projection"])
PROJECTION_CHECKPOINT = Gauge(
    "jetsource_projection_checkpoint", "Last stream sequence a read model has applied", ["projection"])
PROJECTION_PENDING = Gauge(
    "jetsource_projection_pending", "Events stored but not yet applied to a read model (its lag)", ["projection"])
PARKED_EVENTS = Counter(
    "jetsource_parked_events", "Events a reader could not decode or apply and parked", ["reader"])
TASKS_RUNNING = Gauge("jetsource_tasks_running", "Task handlers running in this worker process")
WORKER_REQUEST_SECONDS = Histogram(
    "jetsource_worker_request_seconds", "Round trip of a worker's request to the task actor (a batch counts once)",
    ["command"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 1.0, 5.0))
TASKS_FINISHED = Counter(
    "jetsource_tasks_finished", "Task attempts a worker finished, by outcome", ["type", "outcome"])
