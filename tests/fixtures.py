"""Helpers and fixtures for tests: database reset, the stub broker and worker, the simulated cloud."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Middleware
from sqlalchemy import delete

from jobs import queues
from jobs.broker import broker as project_broker
from jobs.broker import build_middleware
from jobs.redis_broker import JobsRedisBroker
from middleware import Deduplicate, OperationTransitions, Throttle
from middleware.redis_state import LazyRedis
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.config import get_settings
from resources.db import create_schema, get_engine, session_scope
from resources.models import Base, Instance, ServiceSettings, Volume
from resources.redis_client import ThreadConnections, get_redis, settle_replies


class Recorder(Middleware):
    """Counts what the workers processed, per actor and resource, and on which queue."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.processed: list[tuple[str, str, str | None, bool]] = []
        #: (actor, args) of every processed message.
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        with self.lock:
            self.processed.append(
                (message.actor_name, message.queue_name, message.options.get("resource"), exception is None)
            )
            self.calls.append((message.actor_name, tuple(message.args)))

    def reset(self) -> None:
        with self.lock:
            self.processed.clear()
            self.calls.clear()

    def count_call(self, actor_name: str, *args: Any) -> int:
        """How many processed messages of ``actor_name`` had arguments starting with ``args``."""
        return sum(1 for a, call_args in self.calls if a == actor_name and call_args[: len(args)] == args)

    def count(self, actor_name: str, resource: str | None = None) -> int:
        return sum(1 for a, _q, r, _ok in self.processed if a == actor_name and (resource is None or r == resource))

    def queues_used(self) -> Counter[str]:
        return Counter(q for _a, q, _r, _ok in self.processed)


RECORDER = Recorder()
project_broker.add_middleware(RECORDER)
if isinstance(project_broker, StubBroker):
    project_broker.emit_after("process_boot")


def reset_database(url: str | None = None) -> None:
    settle_replies()  # the answers of the last test's sends not waited for are read before its keys go
    create_schema(url)
    engine = get_engine(url)
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(delete(table))


@pytest.fixture
def database() -> Iterator[None]:
    reset_database()
    yield


@pytest.fixture
def cloud() -> SimulatedCloud:
    sim = SimulatedCloud()
    sim.reset()
    sim.configure(SimulatedConfig(build_ms=40, delete_ms=20))
    return sim


@pytest.fixture
def stub_broker(database: None) -> Iterator[StubBroker]:
    """The project's StubBroker, empty; no worker consumes unless the test also asks for stub_worker."""
    assert isinstance(project_broker, StubBroker)
    project_broker.flush_all()
    forget_guards()
    RECORDER.reset()
    previous = dramatiq.get_broker()
    dramatiq.set_broker(project_broker)
    yield project_broker
    dramatiq.set_broker(previous)
    project_broker.flush_all()
    forget_clients(project_broker)


@pytest.fixture
def unchained(stub_broker: StubBroker, monkeypatch: pytest.MonkeyPatch) -> StubBroker:
    """The stub broker with step chaining off: every step goes through the broker, for tests of that path."""
    transitions = next(m for m in stub_broker.middleware if isinstance(m, OperationTransitions))
    monkeypatch.setattr(transitions.chain, "budget_s", 0.0)
    return stub_broker


def forget_clients(broker: dramatiq.Broker) -> None:
    """Middleware open their Redis client on first use, for the REDIS_URL of that moment; a test that
    pointed REDIS_URL at a server of its own must not leave them talking to it."""
    for middleware in broker.middleware:
        if isinstance(middleware, LazyRedis):
            middleware._client = None
        if isinstance(middleware, Deduplicate):
            middleware._client, middleware._settings, middleware._scripts = None, None, {}
        if isinstance(middleware, Throttle):
            middleware._store = None


def forget_guards() -> None:
    """Drop what earlier tests left in Redis about messages: de-duplication guards, claimed ticks,
    in-flight sets. The stub broker's queues are emptied between tests; these must go with them."""
    client = get_redis()
    namespace = get_settings().namespace
    for pattern in ("dedup", "periodic", "inflight"):
        keys = list(client.scan_iter(f"{namespace}:{pattern}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def stub_worker(stub_broker: StubBroker) -> Iterator[Worker]:
    before = list(stub_broker.middleware)
    worker = Worker(stub_broker, worker_timeout=20, worker_threads=4)
    worker.start()
    yield worker
    worker.stop()
    # A Worker adds a middleware of its own to the broker and never takes it away.
    stub_broker.middleware[:] = before


def drain(broker: StubBroker, timeout_s: float = 30.0) -> None:
    """Wait until every queue (and delay queue) is empty and idle, messages hopping between queues, and the
    answers of the sends made meanwhile without waiting are read."""
    deadline = time.monotonic() + timeout_s
    names = [*queues.ALL, *(f"{q}.DQ" for q in queues.ALL)]
    while True:
        for name in queues.ALL:
            broker.join(name, fail_fast=False, timeout=max(1, int((deadline - time.monotonic()) * 1000)))
        if all(broker.queues[n].unfinished_tasks == 0 for n in names):
            settle_replies()
            return
        if time.monotonic() > deadline:
            raise TimeoutError("queues did not drain")


def wait_for(condition: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with suppress(Exception):
            value = condition()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {condition}")
        time.sleep(interval_s)


def make_tenant(
    name: str = "tenant-1", url: str | None = None, options: dict[str, Any] | None = None
) -> ServiceSettings:
    with session_scope(url) as session:
        tenant = ServiceSettings(name=name, backend="simulated", options=options or {})
        session.add(tenant)
    return tenant


def make_instance(tenant: ServiceSettings, name: str = "vm", volumes: int = 2, url: str | None = None) -> Instance:
    with session_scope(url) as session:
        instance = Instance(name=name, service_settings_id=tenant.id, flavor="small")
        session.add(instance)
        session.flush()
        for index in range(volumes):
            session.add(
                Volume(name=f"{name}-vol{index}", size_gb=10, instance_id=instance.id, service_settings_id=tenant.id)
            )
    return instance


@pytest.fixture
def thread_client() -> Iterator[ThreadConnections]:
    """A client of the project's kind (a connection per thread) of its own, on the test's Redis."""
    client = ThreadConnections(redis.ConnectionPool.from_url(os.environ["REDIS_URL"], decode_responses=True))
    yield client
    client.connection_pool.disconnect()


@pytest.fixture
def redis_broker(database) -> Iterator[JobsRedisBroker]:
    """A Redis broker of this test's own, with the project's middleware, current while the test runs."""
    broker = JobsRedisBroker(
        url=os.environ["REDIS_URL"],
        namespace=f"{os.environ['JOBS_NAMESPACE']}:dl-{uuid.uuid4().hex[:8]}",
        middleware=build_middleware(),
        maintenance_chance=0,
    )
    for name in ("default", "heavy"):
        broker.declare_queue(name)
    previous = dramatiq.get_broker()
    dramatiq.set_broker(broker)
    try:
        yield broker
    finally:
        dramatiq.set_broker(previous)
        keys = list(broker.client.scan_iter(f"{broker.namespace}:*", count=1000))
        if keys:
            broker.client.delete(*keys)
