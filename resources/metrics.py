"""The job system's Prometheus metrics, and one small function per event that moves them.

They live at the bottom layer so that resources, middleware and the scheduler can each record their
events where they happen. The metric objects are created on first use, not at import: prometheus_client
chooses between in-process values and the files of its multiprocess mode when it is first imported, and
Dramatiq's Prometheus middleware points it at those files only at process boot, after every module was
imported. Exposition (worker processes only, with ``JOBS_METRICS=1``) is in ``middleware.metrics``.

Counts that belong to a transaction (an operation's end, a state transition) are recorded when it
commits: a rolled-back attempt that is retried must not count twice.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from .after_commit import on_commit

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from .models import Operation

__all__ = [
    "ENABLE_ENV",
    "HANDOFF_BUCKETS_S",
    "OPERATION_BUCKETS_S",
    "Metrics",
    "dedup_skipped",
    "enabled",
    "get_metrics",
    "handoff_started",
    "janitor_rescued",
    "operation_ended",
    "operation_ended_as",
    "operation_ended_now",
    "operations_pruned",
    "outbox_relayed",
    "transition_applied",
]

logger = logging.getLogger(__name__)

#: Turns the exposition on in worker processes (see ``jobs.broker``).
ENABLE_ENV = "JOBS_METRICS"
#: Operations take from a fraction of a second (nothing to do at the backend) to hours (a slow cloud).
OPERATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
#: A hand-off takes milliseconds when a worker is idle, up to the hand-off timeout (60 s) when none is.
HANDOFF_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    operations: Counter
    operation_duration: Histogram
    transitions: Counter
    handoff_latency: Histogram
    dedup_skips: Counter
    janitor_rescues: Counter
    outbox_relayed: Counter
    operations_pruned: Counter


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics() -> Metrics:
    """This process's metric objects, created on first use (see the module's docstring)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _create()
    return _metrics


def _create() -> Metrics:
    import prometheus_client as prom  # here, not at the top: see the module's docstring

    # A registry of our own: in-process exposition and tests read it; in multiprocess mode the values
    # go to the files whatever the registry, and the exposition server reads those.
    registry = prom.CollectorRegistry()
    by_operation = ["executor", "outcome"]
    return Metrics(
        registry=registry,
        operations=prom.Counter(
            "jobs_operations_total",
            "Operations that ended, by executor and outcome (succeeded, failed, cancelled).",
            by_operation,
            registry=registry,
        ),
        operation_duration=prom.Histogram(
            "jobs_operation_duration_seconds",
            "Time from an operation's start (its record's creation) to its end, by executor and outcome.",
            by_operation,
            buckets=OPERATION_BUCKETS_S,
            registry=registry,
        ),
        transitions=prom.Counter(
            "jobs_transitions_total",
            "Resource state transitions applied (committed), by resource type and transition name.",
            ["resource_type", "transition"],
            registry=registry,
        ),
        handoff_latency=prom.Histogram(
            "jobs_throttle_handoff_latency_seconds",
            "Time from a throttle slot's hand-off (the holder's release) to the first step of the operation "
            "it was handed to starting, by the Redis server's clock.",
            buckets=HANDOFF_BUCKETS_S,
            registry=registry,
        ),
        dedup_skips=prom.Counter(
            "jobs_dedup_skips_total",
            "Background jobs not enqueued (stage=enqueue) or not run (stage=run) because an equal job was "
            "queued or running, by job.",
            ["job", "stage"],
            registry=registry,
        ),
        janitor_rescues=prom.Counter(
            "jobs_janitor_rescues_total",
            "Resources the janitor moved to ERRED, by the transitional state they were stuck in.",
            ["state"],
            registry=registry,
        ),
        outbox_relayed=prom.Counter(
            "jobs_outbox_relayed_total",
            "Outbox rows sent by the relay because their committing process had left them unsent.",
            registry=registry,
        ),
        operations_pruned=prom.Counter(
            "jobs_operations_pruned_total",
            "Ended operations the retention job deleted, with their step records.",
            registry=registry,
        ),
    )


def _safely(record: Callable[[], None]) -> None:
    """Metrics never fail the work they measure."""
    try:
        record()
    except Exception:
        logger.warning("could not record a metric", exc_info=True)


def operation_ended(session: Session, operation: Operation) -> None:
    """The operation has just ended in ``session``'s transaction; counted once that commits."""
    operation_ended_as(session, operation.executor, operation.status, operation.created_at, operation.finished_at)


def operation_ended_as(
    session: Session, executor: str, outcome: str, created_at: datetime, finished_at: datetime | None
) -> None:
    """``operation_ended`` for a caller that has the operation's columns rather than its object."""
    on_commit(session, lambda: operation_ended_now(executor, outcome, created_at, finished_at))


def operation_ended_now(executor: str, outcome: str, created_at: datetime, finished_at: datetime | None) -> None:
    """An operation's end, already committed, is counted now (never raises)."""
    duration_s = (finished_at - created_at).total_seconds() if finished_at else 0.0

    def record() -> None:
        metrics = get_metrics()
        metrics.operations.labels(executor, outcome).inc()
        metrics.operation_duration.labels(executor, outcome).observe(max(duration_s, 0.0))

    _safely(record)


def transition_applied(session: Session, resource_type: str, transition: str) -> None:
    """A transition changed a row in ``session``'s transaction; counted once that commits."""
    on_commit(session, lambda: _safely(lambda: get_metrics().transitions.labels(resource_type, transition).inc()))


def handoff_started(latency_ms: Callable[[], int | None]) -> None:
    """The first step of an operation that was handed a slot has started; ``latency_ms`` reads how long
    after the hand-off (None when its record is gone)."""

    def record() -> None:
        latency = latency_ms()
        if latency is not None:
            get_metrics().handoff_latency.observe(max(latency, 0) / 1000)

    _safely(record)


def dedup_skipped(job: str, stage: str) -> None:
    _safely(lambda: get_metrics().dedup_skips.labels(job, stage).inc())


def janitor_rescued(state: str) -> None:
    _safely(lambda: get_metrics().janitor_rescues.labels(str(state)).inc())


def operations_pruned(count: int) -> None:
    if count:
        _safely(lambda: get_metrics().operations_pruned.inc(count))


def outbox_relayed(rows: int) -> None:
    if rows:
        _safely(lambda: get_metrics().outbox_relayed.inc(rows))
