"""The granular tasks. Each does one small thing to one resource; only executors combine them.

Steps take the resource as a ``type:uuid`` reference and find their operation in the step context,
so every database write is guarded by the operation that ordered it. No database transaction stays
open while the cloud is called. Regular steps never retry on their own; polls retry explicitly with a
fixed delay and a bounded number of attempts. Every step retries a transient infrastructure error
(database or Redis unreachable) with backoff: a blip delays an operation, it does not fail it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq import Retry

from middleware import current_step
from middleware.transient import retry_transient, retry_transient_or_asked
from resources.backends import get_backend
from resources.changes import store_changes
from resources.config import get_settings
from resources.db import session_scope
from resources.errors import ConfigurationError, JobsError, ResourceNotFound
from resources.models import Resource
from resources.transitions import apply_transition, load_resource

from . import broker as _broker  # noqa: F401  (sets the broker before the actors below are declared)
from . import queues

__all__ = [
    "PollFailed",
    "backend_method",
    "delete_resource",
    "error_state_transition",
    "heavy_backend_method",
    "poll_backend_check",
    "poll_runtime_state",
    "state_transition",
]

logger = logging.getLogger(__name__)
_settings = get_settings()


class PollFailed(JobsError):
    """A poll saw the erred value, or ran out of attempts."""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _snapshot(ref: str, *, transition: str | None = None, runtime_state: str | None = None) -> Resource:
    """Apply the optional transition, then return a detached copy of the resource for the backend."""
    operation_id = current_step().operation_id
    with session_scope() as session:
        if transition:
            apply_transition(session, ref, transition, operation_id=operation_id)
        resource = load_resource(session, ref)
        if runtime_state is not None:
            store_changes(session, ref, {"runtime_state": runtime_state}, operation_id)
        return resource.snapshot()


def _store(ref: str, changes: dict[str, Any]) -> None:
    with session_scope() as session:
        store_changes(session, ref, changes, current_step().operation_id)


def _call_backend(ref: str, method: str, **kwargs: Any) -> tuple[Resource, Any]:
    resource = _snapshot(ref)
    return resource, _backend_method(resource, method)(resource, **kwargs)


def _label(resource: Resource) -> str:
    return f"{type(resource).__name__} {resource.name!r} ({resource.uuid[:8]}…)"


def _backend_method(resource: Resource, method: str) -> Callable[..., Any]:
    backend = get_backend(resource)
    function = getattr(backend, method, None)
    if not callable(function):
        raise ConfigurationError(
            f"{type(backend).__name__} has no method {method!r} for {resource.resource_type}; "
            "name a method of its backend interface"
        )
    return function


def _run_backend_method(
    ref: str,
    method: str,
    state_transition: str | None = None,
    runtime_state: str | None = None,
    success_runtime_state: str | None = None,
    **kwargs: Any,
) -> None:
    resource = _snapshot(ref, transition=state_transition, runtime_state=runtime_state)
    changes = _backend_method(resource, method)(resource, **kwargs) or {}
    if success_runtime_state is not None:
        changes["runtime_state"] = success_runtime_state
    _store(ref, changes)


backend_method = dramatiq.actor(
    _run_backend_method,
    actor_name="backend_method",
    queue_name=queues.DEFAULT,
    retry_when=retry_transient,
    time_limit=_ms(_settings.step_time_limit_s),
)
backend_method.__doc__ = """Call ``backend.<method>(resource, **kwargs)`` and store what it returns.

Optionally apply ``state_transition`` and set ``runtime_state`` first, and ``success_runtime_state`` after."""

#: The same step for work that cannot be broken down: always on the heavy queue and its own workers.
heavy_backend_method = dramatiq.actor(
    _run_backend_method,
    actor_name="heavy_backend_method",
    queue_name=queues.HEAVY,
    retry_when=retry_transient,
    time_limit=_ms(_settings.step_time_limit_s),
)


@dramatiq.actor(queue_name=queues.DEFAULT, retry_when=retry_transient, time_limit=_ms(_settings.step_time_limit_s))
def state_transition(ref: str, transition: str, clear_action: bool = False) -> None:
    """Apply one named transition (guarded by the current operation)."""
    values = {"action": "", "action_details": {}} if clear_action else None
    with session_scope() as session:
        apply_transition(session, ref, transition, operation_id=current_step().operation_id, values=values)


@dramatiq.actor(queue_name=queues.DEFAULT, retry_when=retry_transient, time_limit=_ms(_settings.step_time_limit_s))
def error_state_transition(ref: str, clear_action: bool = False) -> None:
    """The usual failure callback: the error is already stored on the resource; move it to ERRED."""
    values = {"action": "", "action_details": {}} if clear_action else None
    try:
        with session_scope() as session:
            apply_transition(session, ref, "set_erred", operation_id=current_step().operation_id, values=values)
    except ResourceNotFound:
        logger.info("%s is gone; nothing to mark ERRED", ref)


@dramatiq.actor(queue_name=queues.DEFAULT, retry_when=retry_transient, time_limit=_ms(_settings.step_time_limit_s))
def delete_resource(ref: str) -> None:
    """Delete the resource's row (the end of a delete). Deleting what is already gone is a success."""
    operation_id = current_step().operation_id
    with session_scope() as session:
        try:
            resource = load_resource(session, ref, for_update=True)
        except ResourceNotFound:
            logger.info("%s already deleted", ref)
            return
        if operation_id is not None and resource.operation_id != operation_id:
            logger.warning(
                "%s belongs to operation %s now; deletion by operation %s ignored",
                ref,
                resource.operation_id,
                operation_id,
            )
            return
        # The ORM unlinks dependent rows (an instance's remaining volumes) before deleting.
        session.delete(resource)


#: Polls retry only when they ask to (``Retry``), with their own fixed delay; any other error is final.
poll_actor = functools.partial(
    dramatiq.actor,
    queue_name=queues.DEFAULT,
    max_retries=None,
    retry_when=retry_transient_or_asked,
    time_limit=_ms(_settings.poll_time_limit_s),
)


def _poll_attempts_left(attempts: int) -> bool:
    return current_step().attempt + 1 < attempts


@poll_actor
def poll_runtime_state(
    ref: str,
    success_state: str,
    erred_state: str | None = None,
    pull_method: str = "pull",
    interval_s: float | None = None,
    attempts: int | None = None,
) -> None:
    """Pull the resource until its runtime state is ``success_state``; fail on ``erred_state``."""
    interval_s = interval_s or _settings.poll_interval_s
    attempts = attempts or _settings.poll_state_attempts
    resource, changes = _call_backend(ref, pull_method)
    _store(ref, changes)
    state = changes.get("runtime_state")
    if state == success_state:
        return
    if erred_state is not None and state == erred_state:
        raise PollFailed(f"{_label(resource)} reached runtime state {state!r} while waiting for {success_state!r}")
    if not _poll_attempts_left(attempts):
        raise PollFailed(
            f"{_label(resource)} still {state!r} after {attempts} polls every {interval_s} s; "
            f"expected {success_state!r}"
        )
    raise Retry(f"{ref} is {state!r}, waiting for {success_state!r}", delay=_ms(interval_s))


@poll_actor
def poll_backend_check(
    ref: str, check_method: str = "is_gone", interval_s: float | None = None, attempts: int | None = None
) -> None:
    """Call ``backend.<check_method>(resource)`` until it returns true."""
    interval_s = interval_s or _settings.poll_interval_s
    attempts = attempts or _settings.poll_check_attempts
    resource, done = _call_backend(ref, check_method)
    if done:
        return
    if not _poll_attempts_left(attempts):
        raise PollFailed(f"{_label(resource)}: {check_method} still false after {attempts} polls every {interval_s} s")
    raise Retry(f"{ref}: {check_method} is false", delay=_ms(interval_s))
