"""The audited workload shared by the throttle's chaos test and its benchmark.

Each operation is a few steps with given durations and delays between them; the ``AuditMiddleware``
(installed here, in every worker that loads this module) writes each step's start and end to an audit
stream. Three executors run the same work under three throttles: ours, a Waldur-style count-and-retry,
and Dramatiq's ConcurrentRateLimiter. Worker processes load this module next to ``jobs.app``:
``dramatiq jobs.app benchmarks.workload``.
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
from jobs.broker import broker
from jobs.executors import BaseExecutor, CreateExecutor
from jobs.executors.base import Signature
from jobs.executors.throttling import provisioning_scope
from middleware import OperationTransitions, ThrottleScope, current_step
from resources.config import get_settings
from resources.db import session_scope
from resources.models import Instance, Resource
from resources.states import State
from resources.transitions import apply_transition, load_resource

from .audit import OPTION_AUDIT_LAST, OPTION_AUDIT_STREAM, AuditMiddleware

__all__ = ["AuditedExecutor", "RateLimitedExecutor", "StepFailedOnce", "WaldurStyleExecutor", "audited_steps"]

broker.add_middleware(AuditMiddleware(), after=OperationTransitions)


class StepFailedOnce(Exception):
    """A step's first attempt fails on purpose; its retry succeeds."""


@dramatiq.actor(queue_name=queues.DEFAULT, max_retries=3, min_backoff=20, max_backoff=200)
def audited_step(duration_ms: int, fail_once: bool = False) -> None:
    step = current_step()
    if fail_once and step.attempt == 0:
        raise StepFailedOnce(f"the first attempt of step {step.node} of {step.resource_ref} fails on purpose")
    time.sleep(duration_ms / 1000)


#: The options of every executor of this workload (see ``audited_steps``).
AUDIT_OPTIONS = frozenset({"stream", "durations_ms", "delays_ms", "fail_steps"})


def audited_steps(kwargs: dict[str, Any]) -> list[Any]:
    """The audited steps: ``durations_ms[i]`` long, ``delays_ms[i]`` after the previous one (the first is
    never delayed), the steps in ``fail_steps`` failing once; written to ``stream``."""
    durations, delays = kwargs["durations_ms"], kwargs["delays_ms"]
    fail_steps = set(kwargs.get("fail_steps", ()))
    last = len(durations) - 1
    messages = []
    for index, duration in enumerate(durations):
        options: dict[str, Any] = {OPTION_AUDIT_STREAM: kwargs["stream"], OPTION_AUDIT_LAST: index == last}
        if index and delays[index]:
            options["delay"] = delays[index]
        messages.append(audited_step.message_with_options(args=(duration, index in fail_steps), **options))
    return messages


class AuditedExecutor(BaseExecutor):
    """The workload under our throttle (the provisioning scope of the instance's service settings)."""

    options = AUDIT_OPTIONS

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return [provisioning_scope(instance)]

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return audited_steps(kwargs)


# -- Waldur's throttle: count the scope's resources in CREATING; over the limit, retry in 5 s (up to 300
#    times). It tests `count <= limit`, so it admits limit + 1, and counting then acting is not atomic.
#    The slot is given back by the set_ok step after the work.
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


class WaldurStyleExecutor(CreateExecutor):
    """The workload behind Waldur's count-and-retry throttle instead of ours."""

    options = AUDIT_OPTIONS

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return ()

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        limit = provisioning_scope(instance).limit
        return [waldur_throttle.message(serialized_instance, limit), *audited_steps(kwargs)]


# -- Dramatiq's ConcurrentRateLimiter, held from a step before the work to a step after it (through its
#    private _acquire/_release: its public context manager only covers one block of code), with
#    Dramatiq's default retries: 20 attempts, backoff from 15 s, doubling.
@functools.cache
def _limiter_backend() -> RedisBackend:
    return RedisBackend(url=get_settings().broker_url)


@dramatiq.actor(queue_name=queues.DEFAULT, max_retries=20, min_backoff=15_000, max_backoff=7 * 24 * 3600 * 1000)
def rate_limit_acquire(key: str, limit: int) -> None:
    if not ConcurrentRateLimiter(_limiter_backend(), key, limit=limit)._acquire():
        raise RateLimitExceeded(f"{key} is at its limit of {limit}")


@dramatiq.actor(queue_name=queues.DEFAULT, max_retries=20)
def rate_limit_release(key: str, limit: int) -> None:
    ConcurrentRateLimiter(_limiter_backend(), key, limit=limit)._release()


class RateLimitedExecutor(BaseExecutor):
    """The workload holding a ConcurrentRateLimiter slot from before its first step to after its last."""

    options = AUDIT_OPTIONS

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        scope = provisioning_scope(instance)
        key = f"{get_settings().namespace}:rate-limit:{scope.key}"
        return [
            rate_limit_acquire.message(key, scope.limit),
            *audited_steps(kwargs),
            rate_limit_release.message(key, scope.limit),
        ]
