"""The broker every process of this project uses, set up before any actor is declared.

Dramatiq binds actors to the broker that is current when they are decorated, so every module that
declares actors imports this one first. The broker is Redis (REDIS_URL), or RabbitMQ when BROKER_URL is an
amqp:// URL; ``JOBS_BROKER=stub`` selects a StubBroker for unit tests.
"""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.encoder import JSONEncoder
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from middleware import Deduplicate, InFlight, OperationTransitions, OutboxRelay, PeriodicTicks, Throttle
from middleware.log_context import LogContext
from middleware.transient import PatientRetries
from resources import metrics
from resources.config import get_settings
from resources.redis_client import ThreadConnections

from . import queues
from .hook_dispatch import HandlersOnly
from .redis_broker import BrokerMaintenance, JobsRedisBroker

__all__ = ["broker", "build_broker"]

#: Backoff of retried steps, milliseconds. Only polls retry (with their own fixed delay); this is for
#: actors that opt into retries.
MIN_BACKOFF_MS = int(os.environ.get("JOBS_MIN_BACKOFF_MS", "1000"))
#: The longest wait between two attempts (Dramatiq's default is 7 days): a step waiting out a database
#: outage tries again at least this often.
MAX_BACKOFF_MS = int(os.environ.get("JOBS_MAX_BACKOFF_MS", "60000"))


class JobsRabbitmqBroker(HandlersOnly, RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, its signals sent only to the middleware that handle them."""


class JobsStubBroker(HandlersOnly, StubBroker):
    """Dramatiq's StubBroker (unit tests), its signals dispatched as the real brokers' are."""


def build_middleware() -> list[Middleware]:
    throttle = Throttle()
    return [
        LogContext(),  # first: every other middleware's log lines about a message carry its fields
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        CurrentMessage(),
        # Replaces periodiq's middleware, which drops retries and backlogged ticks as stale.
        PeriodicTicks(),
        # Before PeriodicTicks: a message skipped as a duplicate job does not claim its tick. Before
        # Retries: its after-hook sees message.failed and keeps the guard of a job that will retry.
        Deduplicate(),
        # Which messages of each operation exist, for the janitor.
        InFlight(),
        # Before Retries, so its after-hook sees message.failed (hooks run in reverse order).
        OperationTransitions(throttle=throttle),
        # Its steps' admissions and lease changes come from OperationTransitions; here for its heartbeat.
        throttle,
        # Steps retry only transient errors (and polls when they ask); see middleware.transient.
        PatientRetries(max_retries=0, min_backoff=MIN_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS),
        # Sends what a process committed but could not send (killed after its commit, broker down).
        OutboxRelay(),
    ]


def build_broker() -> dramatiq.Broker:
    settings = get_settings()
    if os.environ.get("JOBS_BROKER") == "stub":
        broker: dramatiq.Broker = JobsStubBroker(middleware=build_middleware())
    elif settings.amqp_url is not None:
        # Publisher confirms: a send returns once RabbitMQ has the message, so the outbox deletes a row
        # only for a message that is really in the broker. RabbitMQ returns a dead worker's unacknowledged
        # messages as soon as its connection drops: no heartbeat timeout or maintenance to tune.
        broker = JobsRabbitmqBroker(url=settings.amqp_url, middleware=build_middleware(), confirm_delivery=True)
    else:
        broker = JobsRedisBroker(
            client=ThreadConnections(redis.ConnectionPool.from_url(settings.broker_url)),
            namespace=f"{settings.namespace}:dramatiq",
            middleware=build_middleware(),
            heartbeat_timeout=settings.broker_heartbeat_timeout_ms,
            maintenance_chance=settings.broker_maintenance_chance,
        )
        # Puts a killed worker's messages back within heartbeat timeout + interval, not by chance.
        broker.add_middleware(BrokerMaintenance(settings.broker_maintenance_interval_s))
    # JOBS_METRICS=1: the exposition on dramatiq_prom_port (see middleware.metrics); never in unit tests.
    if metrics.enabled() and not isinstance(broker, StubBroker):
        from middleware.metrics import JobsPrometheus  # only then: importing it creates dramatiq_prom_db

        # First: it must see the start of every message that a later middleware may skip.
        broker.add_middleware(JobsPrometheus(), before=AgeLimit)
    for name in queues.ALL:
        broker.declare_queue(name)
    return broker


# JSON, said explicitly: it is Dramatiq's default, but a PickleEncoder set by anything imported later
# would let a message body run code in a worker. Every message carries references, never objects.
dramatiq.set_encoder(JSONEncoder())
broker = build_broker()
dramatiq.set_broker(broker)
