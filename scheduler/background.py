"""Declaring background jobs: actors on the ``background`` queue that are never queued twice.

``@background_job`` is Waldur's BackgroundTask: sending it while an equal job (same actor, same
arguments unless ``dedup=`` says otherwise) is queued or running enqueues nothing and returns None.
``@periodic_job("0 * * * *", env="JOBS_PULL_SCHEDULE")`` is also sent by the scheduler on that schedule,
which the environment variable overrides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import dramatiq
from dramatiq import Message

from jobs import queues
from middleware import DuplicateJob, find_deduplicate

from .schedules import InvalidSchedule, parse_schedule

__all__ = ["BackgroundActor", "background_job", "periodic_job"]

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class BackgroundActor(dramatiq.Actor):  # type: ignore[type-arg]
    """An actor whose ``send`` of a duplicate is a logged no-op (returns None) rather than an error, and
    whose failed send (broker unreachable) gives back the guard it took, so nothing waits on a ghost."""

    def send_with_options(  # type: ignore[override]
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> Message[Any] | None:
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        message = self.message_with_options(args=args, kwargs=kwargs, **options)
        try:
            return self.broker.enqueue(message, delay=delay)
        except DuplicateJob as duplicate:
            logger.debug("%s", duplicate)
            return None
        except Exception:
            dedup = find_deduplicate(self.broker)
            if dedup is not None:
                dedup.give_back(self.broker, message)
            raise


def background_job(fn: F | None = None, *, dedup: bool | Callable[..., str] = True, **options: Any) -> Any:
    """``@dramatiq.actor`` on the background queue, de-duplicated. Options are Dramatiq's."""

    def decorate(function: F) -> BackgroundActor:
        return dramatiq.actor(
            function, actor_class=BackgroundActor, queue_name=queues.BACKGROUND, dedup=dedup, **options
        )

    return decorate if fn is None else decorate(fn)


def periodic_job(default_schedule: str, *, env: str, **options: Any) -> Callable[[F], BackgroundActor]:
    """A background job the scheduler sends on ``default_schedule`` (cron or ``@every``), or on the
    schedule in the environment variable ``env``. A bad schedule stops the import, naming the job."""

    def decorate(function: F) -> BackgroundActor:
        expression = os.environ.get(env) or default_schedule
        job = options.get("actor_name", function.__name__)
        try:
            periodic = parse_schedule(expression, job=job)
        except InvalidSchedule as error:
            origin = f"from {env}; fix or unset it" if os.environ.get(env) else "its default"
            raise InvalidSchedule(f"{error} (schedule {origin})") from None
        return background_job(function, periodic=periodic, **options)

    return decorate
