"""What ``python -m jobs status`` shows, gathered without printing: resources by type and state, the
operations in flight, each queue's counts, the throttle's scopes, and the scheduler.

Each part is read on its own (the database, the broker's keys, the throttle, the scheduler's lease and
ledger), so the parts are each consistent but not one snapshot of the whole system.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from middleware.throttle import ThrottleStore
from resources.db import read_scope
from resources.models import Operation, OperationStatus, resource_types, utcnow

from .dead_letters import QueueKeys
from .plugins import scheduler_status_provider

__all__ = [
    "InFlightOperation",
    "OperationsInFlight",
    "QueueCounts",
    "ScheduledJob",
    "SchedulerStatus",
    "ScopeSummary",
    "SystemStatus",
    "gather_status",
    "installed_scheduler_status",
    "operations_in_flight",
    "queue_counts",
    "resource_counts",
    "throttle_summary",
]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


@dataclass(frozen=True)
class InFlightOperation:
    id: str
    executor: str
    resource_ref: str
    started: datetime
    age_s: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "started": _iso(self.started)}


@dataclass(frozen=True)
class OperationsInFlight:
    count: int
    #: The longest-running first.
    oldest: list[InFlightOperation]

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "oldest": [o.as_dict() for o in self.oldest]}


@dataclass(frozen=True)
class QueueCounts:
    #: Waiting to be fetched by a worker.
    ready: int
    #: Waiting for their time (retries, polls, countdowns), whether a worker holds them yet or not.
    delayed: int
    #: Failed for good; see ``python -m jobs dead-letters``.
    dead_lettered: int
    #: Fetched by a worker and not yet acknowledged: running, or prefetched. A killed worker's stay
    #: counted here until broker maintenance puts them back.
    in_progress: int | None


@dataclass(frozen=True)
class ScopeSummary:
    scope: str
    limit: int | None
    holders: int
    waiters: int
    #: How long the first in line has waited (None when nobody waits).
    oldest_wait_s: float | None


@dataclass(frozen=True)
class ScheduledJob:
    name: str
    #: The schedule as declared: five cron fields, an alias, or ``@every <n>s``.
    cron: str
    #: The last tick the scheduler handled (sent, or skipped as a duplicate); None if never.
    last_run: datetime | None
    next_run: datetime

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cron": self.cron, "last_run": _iso(self.last_run), "next_run": _iso(self.next_run)}


@dataclass(frozen=True)
class SchedulerStatus:
    #: The scheduler process holding the leader lease (host:pid:token); None when none runs.
    leader: str | None
    lease_expires_in_s: float | None
    jobs: list[ScheduledJob]

    def as_dict(self) -> dict[str, Any]:
        return {
            "leader": self.leader,
            "lease_expires_in_s": self.lease_expires_in_s,
            "jobs": [job.as_dict() for job in self.jobs],
        }


@dataclass(frozen=True)
class SystemStatus:
    generated_at: datetime
    #: {resource type: {state: count}}; states without resources are left out.
    resources: dict[str, dict[str, int]]
    operations_in_flight: OperationsInFlight
    queues: dict[str, QueueCounts]
    throttle: list[ScopeSummary]
    #: None when no scheduler package is installed.
    scheduler: SchedulerStatus | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_at": _iso(self.generated_at),
            "resources": self.resources,
            "operations_in_flight": self.operations_in_flight.as_dict(),
            "queues": {name: asdict(counts) for name, counts in self.queues.items()},
            "throttle": [asdict(scope) for scope in self.throttle],
            "scheduler": None if self.scheduler is None else self.scheduler.as_dict(),
        }


# -- the database ----------------------------------------------------------------------------------------
def resource_counts(session: Session) -> dict[str, dict[str, int]]:
    """Every registered resource type (even with no rows), with its count per state."""
    counts: dict[str, dict[str, int]] = {}
    for name, model in sorted(resource_types().items()):
        rows = session.execute(select(model.state, func.count()).group_by(model.state)).all()
        counts[name] = {str(state): int(n) for state, n in sorted(rows, key=lambda row: str(row[0]))}
    return counts


def operations_in_flight(session: Session, *, oldest: int = 10, now: datetime | None = None) -> OperationsInFlight:
    """How many operations are running, and the ``oldest`` that started first."""
    running = Operation.status == OperationStatus.RUNNING
    count = session.scalar(select(func.count()).select_from(Operation).where(running)) or 0
    rows = session.scalars(select(Operation).where(running).order_by(Operation.created_at, Operation.id).limit(oldest))
    now = now or utcnow()  # naive UTC, as the rows' times
    return OperationsInFlight(
        int(count),
        [
            InFlightOperation(
                op.id,
                op.executor,
                op.resource_ref,
                op.created_at.replace(tzinfo=UTC),
                round(max(0.0, (now - op.created_at).total_seconds()), 1),
            )
            for op in rows
        ],
    )


# -- the broker ------------------------------------------------------------------------------------------
def _canonical_queues(broker: dramatiq.Broker) -> list[str]:
    return sorted(q for q in broker.get_declared_queues() if not q.endswith((".DQ", ".XQ")))


def queue_counts(broker: dramatiq.Broker) -> dict[str, QueueCounts]:
    """Each declared queue's counts, for Dramatiq's Redis or RabbitMQ broker, or its StubBroker."""
    names = _canonical_queues(broker)
    if isinstance(broker, RedisBroker):
        # One MULTI: a message moving between the list and a worker is counted once.
        with broker.client.pipeline(transaction=True) as pipe:
            for name in names:
                keys = QueueKeys(broker.namespace, name)
                pipe.llen(keys.ready)
                pipe.hlen(keys.bodies)
                pipe.hlen(keys.delayed_bodies)
                pipe.zcard(keys.dead)
            values = [int(v) for v in pipe.execute()]
        counts = {}
        for index, name in enumerate(names):
            ready, bodies, delayed, dead = values[4 * index : 4 * index + 4]
            # Bodies not in the list were fetched by a worker and are not acknowledged yet.
            counts[name] = QueueCounts(ready, delayed, dead, max(0, bodies - ready))
        return counts
    if isinstance(broker, RabbitmqBroker):
        # RabbitMQ reports ready messages per queue; it does not say how many its consumers hold.
        result = {}
        for name in names:
            ready, delayed, dead = broker.get_queue_message_counts(name)
            result[name] = QueueCounts(ready, delayed, dead, None)
        return result
    if isinstance(broker, StubBroker):
        result = {}
        for name in names:
            queue, delay_queue = broker.queues[name], broker.queues[dq_name(name)]
            result[name] = QueueCounts(
                queue.qsize(),
                delay_queue.unfinished_tasks,
                len(broker.dead_letters_by_queue[name]),
                max(0, queue.unfinished_tasks - queue.qsize()),
            )
        return result
    raise TypeError(f"cannot count the messages of a {type(broker).__name__}")


# -- the throttle ----------------------------------------------------------------------------------------
def throttle_summary(store: ThrottleStore) -> list[ScopeSummary]:
    """Every scope the throttle knows, with its limit, holders, waiters and how long the first waits."""
    seconds, micros = store.client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000  # the throttle's clock: the Redis server's
    summaries = []
    for scope in store.scopes():
        explanation = store.explain(scope, max_waiters=1)
        first = explanation.waiters[0] if explanation.waiters else None
        oldest_wait_s = None if first is None else round(max(0, now_ms - first.waiting_since_ms) / 1000, 1)
        summaries.append(
            ScopeSummary(scope, explanation.limit, len(explanation.holders), explanation.waiting, oldest_wait_s)
        )
    return summaries


# -- the scheduler ---------------------------------------------------------------------------------------
def installed_scheduler_status() -> SchedulerStatus | None:
    """The scheduler's section, from the scheduler package (a layer above, found by its entry point)."""
    provider = scheduler_status_provider()
    return None if provider is None else provider()


def _default_store() -> ThrottleStore:
    from middleware import Throttle

    return Throttle().store


def gather_status(
    *,
    broker: dramatiq.Broker | None = None,
    store: ThrottleStore | None = None,
    scheduler: SchedulerStatus | None = None,
    oldest: int = 10,
) -> SystemStatus:
    """Everything ``python -m jobs status`` shows. Defaults: the current broker, its throttle's store and
    the installed scheduler's section (see ``installed_scheduler_status``)."""
    broker = broker or dramatiq.get_broker()
    with read_scope() as session:
        resources = resource_counts(session)
        in_flight = operations_in_flight(session, oldest=oldest)
    return SystemStatus(
        generated_at=datetime.fromtimestamp(time.time(), UTC),
        resources=resources,
        operations_in_flight=in_flight,
        queues=queue_counts(broker),
        throttle=throttle_summary(store or _default_store()),
        scheduler=scheduler or installed_scheduler_status(),
    )
