"""A periodic job for scheduler tests: each run appends its tick and message id to a Redis list.

Loaded by the test's scheduler and background worker processes next to ``scheduler.app``.
"""

from __future__ import annotations

from dramatiq.middleware import CurrentMessage

from resources.config import get_settings
from resources.redis_client import get_redis
from scheduler.background import background_job, periodic_job

#: Ticks every 3 s unless the test sets JOBS_PROBE_SCHEDULE.
PROBE_SCHEDULE = "@every 3s"


def runs_key() -> str:
    return f"{get_settings().namespace}:probe:runs"


@periodic_job(PROBE_SCHEDULE, env="JOBS_PROBE_SCHEDULE", max_retries=0)
def probe_tick() -> None:
    message = CurrentMessage.get_current_message()
    assert message is not None
    get_redis().rpush(runs_key(), f"{message.options['tick']} {message.message_id}")


def work_key() -> str:
    return f"{get_settings().namespace}:probe:work"


@background_job(max_retries=0)
def probe_work(n: int) -> None:
    """A background job that records its argument."""
    get_redis().rpush(work_key(), n)


@background_job(max_retries=0)
def probe_block(name: str) -> None:
    """A background job that runs until the test pushes to its key (or a minute has passed)."""
    get_redis().rpush(work_key(), f"started {name}")
    get_redis().blpop([f"{get_settings().namespace}:probe:release:{name}"], timeout=60)
