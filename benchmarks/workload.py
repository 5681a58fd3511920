"""The audited workload shared by the throttle's chaos test and its benchmark.

Each operation is three steps with given durations and delays between them; every step start and end is
written to an audit stream (see ``audit.py``). Three executors run it under three throttles: ours, a
Waldur-style count-and-retry, and Dramatiq's ConcurrentRateLimiter. Worker processes load this module
next to ``jobs.app``: ``dramatiq jobs.app benchmarks.workload``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq import Retry
from dramatiq.rate_limits import ConcurrentRateLimiter, RateLimitExceeded
from dramatiq.rate_limits.backends import RedisBackend
from sqlalchemy import func, select

from jobs import queues
from jobs.broker import broker  # noqa: F401  (actors bind to the project's broker)
from jobs.executors import BaseExecutor, CreateExecutor
from jobs.executors.base import Signature
from jobs.executors.throttling import provisioning_scope
from middleware import ThrottleScope, current_step
from resources.config import get_settings
from resources.db import session_scope
from resources.models import Instance, Resource
from resources.redis_client import get_redis
from resources.states import State
from resources.transitions import apply_transition, load_resource

from .audit import AuditLog

__all__ = ["AuditedExecutor", "RateLimitedExecutor", "StepFailedOnce", "WaldurStyleExecutor", "workload_plan"]


class StepFailedOnce(Exception):
    """A step's first attempt fails on purpose; its retry succeeds."""


@functools.cache
def _log(stream: str) -> AuditLog:
    return AuditLog(get_redis(), stream)


def _run_step(stream: str, ref: str, last: bool, duration_ms: int, fail_once: bool) -> None:
    step = current_step()
    log = _log(stream)
    log.record("start", op=step.operation_id, ref=ref)
    if fail_once and step.attempt == 0:
        log.record("fail", op=step.operation_id, ref=ref)
        raise StepFailedOnce(f"first attempt of a step of {ref} fails on purpose")
    time.sleep(duration_ms / 1000)
    log.record("end", op=step.operation_id, ref=ref, last=int(last))


@dramatiq.actor(queue_name=queues.DEFAULT, max_retries=3, min_backoff=20, max_backoff=200)
def audited_step(stream: str, ref: str, last: bool, duration_ms: int, fail_once: bool = False) -> None:
    _run_step(stream, ref, last, duration_ms, fail_once)


# -- Dramatiq's ConcurrentRateLimiter, held from the first step to the last (through its private
#    _acquire/_release: its public context manager only covers one block of code). Dramatiq's default
#    retries: 20 attempts, backoff from 15 s, doubling.
@functools.cache
def _limiter_backend() -> RedisBackend:
    return RedisBackend(url=get_settings().broker_url)


def _limiter(key: str, limit: int) -> ConcurrentRateLimiter:
    return ConcurrentRateLimiter(_limiter_backend(), key, limit=limit)


@dramatiq.actor(queue_name=queues.DEFAULT, max_retries=20, min_backoff=15_000, max_backoff=7 * 24 * 3600 * 1000)
def rate_limited_step(
    stream: str, ref: str, first: bool, last: bool, duration_ms: int, key: str, limit: int, fail_once: bool = False
) -> None:
    limiter = _limiter(key, limit)
    if first and not limiter._acquire():
        raise RateLimitExceeded(f"{key} is at its limit of {limit}")
    _run_step(stream, ref, last, duration_ms, fail_once)
    if last:
        limiter._release()


# -- Waldur's throttle: count the scope's resources in CREATING; over the limit, retry in 5 s (up to 300
#    times). It tests `count <= limit`, so it admits limit + 1, and counting then acting is not atomic.
@dramatiq.actor(queue_name=queues.DEFAULT, max_retries=300)
def waldur_throttle(ref: str, limit: int) -> None:
    with session_scope() as session:
        instance = load_resource(session, ref)
        count = session.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.service_settings_id == instance.service_settings_id, Instance.state == State.CREATING)
        )
        if count > limit:
            raise Retry(f"{count} provisionings running in the scope; limit {limit}", delay=5000)
        apply_transition(session, ref, "begin_creating", operation_id=current_step().operation_id)


def workload_plan(
    actor_message: Any, durations_ms: Sequence[int], delays_ms: Sequence[int], fail_steps: Sequence[int]
) -> list[Any]:
    """Three (or len(durations_ms)) steps; ``delays_ms[i]`` before step i (the first is not delayed)."""
    messages = []
    for index, duration in enumerate(durations_ms):
        options = {"delay": delays_ms[index]} if index and delays_ms[index] else {}
        messages.append(actor_message(index, duration, index in fail_steps, options))
    return messages


class AuditedExecutor(BaseExecutor):
    """The workload under our throttle (the provisioning scope of the instance's service settings)."""

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return [provisioning_scope(instance)]

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        stream, durations = kwargs["stream"], kwargs["durations_ms"]
        last = len(durations) - 1
        return workload_plan(
            lambda i, duration, fail, options: audited_step.message_with_options(
                args=(stream, serialized_instance, i == last, duration, fail), **options
            ),
            durations,
            kwargs["delays_ms"],
            kwargs.get("fail_steps", ()),
        )


class WaldurStyleExecutor(CreateExecutor):
    """The workload behind Waldur's count-and-retry throttle instead of ours."""

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return ()

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            waldur_throttle.message(serialized_instance, provisioning_scope(instance).limit),
            *AuditedExecutor.get_task_signature(instance, serialized_instance, **kwargs),
        ]


class RateLimitedExecutor(BaseExecutor):
    """The workload holding a ConcurrentRateLimiter slot from its first step to its last."""

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        stream, durations = kwargs["stream"], kwargs["durations_ms"]
        scope = provisioning_scope(instance)
        last = len(durations) - 1
        return workload_plan(
            lambda i, duration, fail, options: rate_limited_step.message_with_options(
                args=(stream, serialized_instance, i == 0, i == last, duration, scope.key, scope.limit, fail),
                **options,
            ),
            durations,
            kwargs["delays_ms"],
            kwargs.get("fail_steps", ()),
        )

