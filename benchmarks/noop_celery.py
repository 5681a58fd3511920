"""Celery's side of the throughput benchmark (``throughput.py``): one no-op task, Redis as the broker, no
result backend (a chain carries its remaining tasks in each message and needs none).

Worker processes: ``celery -A benchmarks.noop_celery worker``. Needs the ``bench`` extra.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import redis
from celery import Celery, signals

from benchmarks.throughput import CELERY_BROKER_ENV, CELERY_PREFIX_ENV, CELERY_QUEUE, CELERY_READY_KEY

__all__ = ["app", "step"]

app = Celery("bench", broker=os.environ[CELERY_BROKER_ENV])
app.conf.update(
    # Every kombu key (queues, bindings, unacked) under the benchmark's own prefix.
    broker_transport_options={"global_keyprefix": os.environ[CELERY_PREFIX_ENV]},
    broker_connection_retry_on_startup=True,
    task_default_queue=CELERY_QUEUE,
    task_ignore_result=True,
    # No remote control or events: nothing the other two variants do either.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
)


@functools.cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@app.task(name="bench.step")
def step(counter: str = "") -> None:
    # Only the last task of a chain counts (see benchmarks.noop).
    if counter:
        _client().incr(counter)


@signals.worker_ready.connect
def _announce_ready(**kwargs: Any) -> None:
    # Each worker process says once that it consumes.
    _client().incr(os.environ[CELERY_PREFIX_ENV] + CELERY_READY_KEY)
