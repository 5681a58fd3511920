"""Plain Dramatiq's side of the throughput benchmark (``throughput.py``): a stock ``RedisBroker`` with its
default middleware and one no-op actor, nothing of this project.

Worker processes: ``dramatiq benchmarks.noop_plain:broker``. The broker is named explicitly rather than
made the global one, so the benchmark's own process can import this module beside the project's broker.
"""

from __future__ import annotations

import functools
import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from benchmarks.throughput import PLAIN_NAMESPACE_ENV, PLAIN_QUEUE

__all__ = ["broker", "plain_stamp", "plain_step"]

# Its own key namespace, apart from the executors'.
broker = RedisBroker(url=os.environ["REDIS_URL"], namespace=os.environ[PLAIN_NAMESPACE_ENV])


@functools.cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@dramatiq.actor(broker=broker, queue_name=PLAIN_QUEUE)
def plain_step(counter: str = "") -> None:
    # Only the last step of a pipeline counts (see benchmarks.noop).
    if counter:
        _client().incr(counter)


@dramatiq.actor(broker=broker, queue_name=PLAIN_QUEUE)
def plain_stamp(key: str) -> None:
    # When it started, for the pick-up latency of an idle worker (benchmarks.idle).
    _client().rpush(key, repr(time.time()))
