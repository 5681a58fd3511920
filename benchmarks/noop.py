"""The executors' side of the throughput benchmark (``throughput.py``): an operation of no-op steps in
sequence, on the project's broker, with its state in the database and its throttle scope.

Worker processes load it next to ``jobs.app``: ``dramatiq jobs.app benchmarks.noop``. With
``BENCH_PROFILE_DIR`` set, every worker and consumer thread runs under cProfile and writes its figures
there when the worker stops (``throughput.py --profile`` reads them).
"""

from __future__ import annotations

import cProfile
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from jobs import queues
from jobs.broker import broker
from jobs.executors import BaseExecutor
from jobs.executors.base import Signature
from jobs.executors.throttling import provisioning_scope
from middleware import ThrottleScope
from resources.models import Resource
from resources.redis_client import get_redis

from .throughput import PROFILE_ENV

__all__ = ["NoopExecutor", "ThreadProfiler", "UnthrottledNoopExecutor", "noop_step", "stamp_step"]


@dramatiq.actor(queue_name=queues.DEFAULT)
def noop_step(counter: str = "") -> None:
    # Only the last step counts: the benchmark waits for the counter to reach the number of operations.
    if counter:
        get_redis().incr(counter)


@dramatiq.actor(queue_name=queues.DEFAULT)
def stamp_step(key: str) -> None:
    # When it started, for the pick-up latency of an idle worker (benchmarks.idle).
    get_redis().rpush(key, repr(time.time()))


class NoopExecutor(BaseExecutor):
    """``steps`` no-op steps in sequence (the last one counts), holding a slot of the instance's provisioning
    scope (the benchmark sets its limit above the number of operations, so it never makes one wait)."""

    required_options = frozenset({"counter", "steps"})

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return [provisioning_scope(instance)]

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        steps = kwargs["steps"]
        return [*(noop_step.message() for _ in range(steps - 1)), noop_step.message(kwargs["counter"])]


class UnthrottledNoopExecutor(NoopExecutor):
    """The same steps, holding no throttle slot (``benchmarks.enqueue``: the other way ``execute()`` sends)."""

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return ()


class ThreadProfiler(Middleware):
    """cProfile in each worker and consumer thread, from its boot to its shutdown (cProfile only sees the
    thread that enabled it). One file per thread: ``<pid>-<kind>-<thread id>.prof``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._local = threading.local()

    def _start(self) -> None:
        self._local.profile = cProfile.Profile()
        self._local.profile.enable()

    def _stop(self, kind: str) -> None:
        profile = getattr(self._local, "profile", None)
        if profile is None:
            return
        profile.disable()
        self.directory.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(self.directory / f"{os.getpid()}-{kind}-{threading.get_ident()}.prof")

    def after_worker_thread_boot(self, broker: dramatiq.Broker, thread: Any) -> None:
        self._start()

    def before_worker_thread_shutdown(self, broker: dramatiq.Broker, thread: Any) -> None:
        self._stop("worker")

    def after_consumer_thread_boot(self, broker: dramatiq.Broker, thread: Any) -> None:
        self._start()

    def before_consumer_thread_shutdown(self, broker: dramatiq.Broker, thread: Any) -> None:
        self._stop("consumer")


if os.environ.get(PROFILE_ENV):
    broker.add_middleware(ThreadProfiler(Path(os.environ[PROFILE_ENV])))
