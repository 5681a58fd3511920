"""The broker every process of this project uses, set up before any actor is declared.

Dramatiq binds actors to the broker that is current when they are decorated, so every module that
declares actors imports this one first. ``JOBS_BROKER=stub`` selects a StubBroker for unit tests.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from middleware import Deduplicate, InFlight, OperationTransitions, PeriodicTicks, Throttle
from resources.config import get_settings

from . import queues

__all__ = ["broker", "build_broker"]

#: Backoff of retried steps, milliseconds. Only polls retry (with their own fixed delay); this is for
#: actors that opt into retries.
MIN_BACKOFF_MS = int(os.environ.get("JOBS_MIN_BACKOFF_MS", "1000"))


def build_middleware() -> list[Middleware]:
    throttle = Throttle()
    return [
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
        # After it: its after-hook (the step is over: the lease stops expiring) runs first.
        throttle,
        # Regular steps never retry on their own; polls retry explicitly.
        Retries(max_retries=0, min_backoff=MIN_BACKOFF_MS),
    ]


def build_broker() -> dramatiq.Broker:
    settings = get_settings()
    if os.environ.get("JOBS_BROKER") == "stub":
        broker: dramatiq.Broker = StubBroker(middleware=build_middleware())
    else:
        broker = RedisBroker(
            url=settings.broker_url,
            namespace=f"{settings.namespace}:dramatiq",
            middleware=build_middleware(),
            heartbeat_timeout=settings.broker_heartbeat_timeout_ms,
            maintenance_chance=settings.broker_maintenance_chance,
        )
    for name in queues.ALL:
        broker.declare_queue(name)
    return broker


broker = build_broker()
dramatiq.set_broker(broker)
