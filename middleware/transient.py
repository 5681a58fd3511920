"""Transient infrastructure errors: the database or Redis did not answer for a moment.

A step that hits one is retried with backoff (``retry_transient`` is every step actor's ``retry_when``)
instead of failing its operation on the first blip. Dramatiq swallows any error a ``before_*`` hook raises
except a MiddlewareError, so hooks wrap such errors in :class:`Unavailable`; the step is then retried like
any other transient failure. Work after a step (recording its completion) is retried in place, the step's
message unacknowledged, because by then the step has had its effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import dramatiq
import redis
from dramatiq import Retry
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import MiddlewareError, Retries
from sqlalchemy import exc as sql_errors

from resources.config import get_settings

__all__ = [
    "PatientRetries",
    "Unavailable",
    "is_transient",
    "retry_in_place",
    "retry_transient",
    "retry_transient_or_asked",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Errors that say "not now" rather than "never": a connection refused or dropped, a lock timeout,
#: Redis still loading its data after a restart.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sql_errors.OperationalError,
    sql_errors.InterfaceError,
    sql_errors.TimeoutError,
    redis.ConnectionError,
    redis.TimeoutError,
    BrokerConnectionError,
)


class Unavailable(MiddlewareError):
    """A middleware could not reach the database or Redis before a step; the step is retried later."""


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (Unavailable, *TRANSIENT_ERRORS)):
        return True
    return isinstance(error, sql_errors.DBAPIError) and error.connection_invalidated


def retry_transient(retries: int, error: BaseException) -> bool:
    """Dramatiq ``retry_when``: retry a transient error up to ``JOBS_TRANSIENT_RETRIES`` times."""
    return is_transient(error) and retries < get_settings().transient_retries


def retry_transient_or_asked(retries: int, error: BaseException) -> bool:
    """For polls: retry when the step asks (``raise Retry``) or on a transient error."""
    return isinstance(error, Retry) or retry_transient(retries, error)


def retry_in_place(work: Callable[[], T], what: str, *, first_wait_s: float = 0.5, max_wait_s: float = 8.0) -> T:
    """Run ``work``; on a transient error wait and run it again, up to ``JOBS_TRANSIENT_RETRIES`` times."""
    attempts = get_settings().transient_retries
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except Exception as error:
            if not is_transient(error) or attempt == attempts:
                raise
            logger.warning("%s failed (%s); attempt %d of %d in %.1f s", what, error, attempt + 1, attempts, wait)
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)
    raise AssertionError("unreachable")


class _PatientBroker:
    """A broker whose ``enqueue`` waits for the broker to answer instead of raising."""

    def __init__(self, broker: dramatiq.Broker, wait_s: Callable[[int], float]) -> None:
        self._broker = broker
        self._wait_s = wait_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        attempt = 0
        while True:
            try:
                return self._broker.enqueue(message, delay=delay)
            except (redis.ConnectionError, redis.TimeoutError, BrokerConnectionError) as error:
                attempt += 1
                wait = self._wait_s(attempt)
                logger.warning("retry of %s not enqueued (%s); trying again in %.0f s", message, error, wait)
                time.sleep(wait)


class PatientRetries(Retries):
    """Dramatiq's Retries, except that a retry the broker cannot take right now (Redis restarting) is
    enqueued again until it can, the message unacknowledged meanwhile, as Dramatiq does with acks.
    Dramatiq's own would log the error and then acknowledge the message: the retry would be lost."""

    def __init__(self, *, enqueue_wait_s: Callable[[int], float] | None = None, **options: Any) -> None:
        super().__init__(**options)
        #: Seconds to wait before the n-th new attempt to enqueue a retry.
        self.enqueue_wait_s = enqueue_wait_s or (lambda attempt: min(2.0**attempt, 30.0))

    def after_process_message(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], *, result: Any = None, exception: Any = None
    ) -> None:
        patient = _PatientBroker(broker, self.enqueue_wait_s)
        super().after_process_message(patient, message, result=result, exception=exception)  # type: ignore[arg-type]
