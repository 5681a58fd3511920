"""A throttled operation's first steps go to the project's Redis broker in the round trip of its admission, and
only if it is granted (real Redis)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from dramatiq import Message
from dramatiq.common import dq_name

from jobs.redis_broker import JobsRedisBroker
from middleware.inflight import InFlight
from middleware.plan import OPTION_OPERATION
from middleware.progress import Outgoing
from middleware.throttle import Throttle, ThrottleScope, ThrottleStore
from resources.config import get_settings

QUEUE = "default"


class RoundTrips:
    """Counts the client's round trips: every command, script call or pipeline takes a connection once."""

    def __init__(self, client: redis.Redis) -> None:
        self.count = 0
        pool = client.connection_pool
        take = pool.get_connection

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return take(*args, **kwargs)

        pool.get_connection = counted  # type: ignore[method-assign]


@pytest.fixture
def client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    namespace = f"{os.environ['JOBS_NAMESPACE']}:admit-{uuid.uuid4().hex[:8]}"
    yield namespace
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def inflight(client: redis.Redis, namespace: str) -> InFlight:
    return InFlight(client, f"{namespace}:inflight")


@pytest.fixture
def throttle(client: redis.Redis, namespace: str) -> Throttle:
    store = ThrottleStore(client, f"{namespace}:throttle", lease_ms=10_000, handoff_timeout_ms=60_000)
    return Throttle(get_settings(), store=store)


@pytest.fixture
def broker(client: redis.Redis, namespace: str, inflight: InFlight, throttle: Throttle) -> JobsRedisBroker:
    broker = JobsRedisBroker(client=client, namespace=namespace, middleware=[inflight, throttle], maintenance_chance=0)
    broker.declare_queue(QUEUE)
    return broker


def _first_steps(operation_id: str, *delays: int | None) -> list[Outgoing]:
    return [
        Outgoing(
            Message(
                queue_name=QUEUE, actor_name="step", args=(index,), kwargs={}, options={OPTION_OPERATION: operation_id}
            ),
            delay,
        )
        for index, delay in enumerate(delays)
    ]


def _queued(broker: JobsRedisBroker, queue_name: str = QUEUE) -> list[Message[Any]]:
    client = broker.client
    ids = client.lrange(f"{broker.namespace}:{queue_name}", 0, -1)
    return [Message.decode(client.hget(broker.bodies_key(queue_name), id_).encode()) for id_ in ids]


def _operations(messages: list[Message[Any]]) -> list[str]:
    return [message.options[OPTION_OPERATION] for message in messages]


def _granting_keys(client: redis.Redis, namespace: str) -> list[str]:
    return list(client.scan_iter(f"{namespace}:throttle:granting:*", count=1000))


def test_a_granted_operations_first_steps_are_stored_in_the_round_trip_of_its_admission(
    broker, client, namespace, inflight, throttle
):
    # Given a throttled operation whose scope has room, with one step now and one delayed, on a server that has
    # this process's scripts (an earlier operation loaded them)
    throttle.admit(broker, "op-0", [ThrottleScope("tenant:other", 1)], _first_steps("op-0", None), send=True)
    scope = ThrottleScope("tenant:a", 2)
    outgoing = _first_steps("op-1", None, 60_000)
    trips = RoundTrips(client)

    # When it is admitted with its send
    admission = throttle.admit(broker, "op-1", [scope], outgoing, send=True)

    # Then it was granted and sent, in one round trip: the admission, both stores and their in-flight names
    assert (admission.status, admission.sent) == ("granted", True)
    assert trips.count == 1
    assert _operations(_queued(broker)) == ["op-0", "op-1"]
    assert _operations(_queued(broker, dq_name(QUEUE))) == ["op-1"]
    assert len(inflight.copies("op-1")) == 2
    assert client.llen(broker.wakeups_key(QUEUE)) == 2
    assert _granting_keys(client, namespace) == []


def test_a_parked_operations_first_steps_are_not_stored_until_its_turn(broker, client, namespace, inflight, throttle):
    # Given a scope of one slot, held by a first operation
    scope = ThrottleScope("tenant:b", 1)
    assert throttle.admit(broker, "op-1", [scope], _first_steps("op-1", None), send=True).sent

    # When a second one is admitted with its send
    admission = throttle.admit(broker, "op-2", [scope], _first_steps("op-2", None), send=True)

    # Then it waits, and nothing of it is in the broker: no message, no in-flight name, no wake-up token
    assert (admission.status, admission.sent) == ("parked", False)
    assert _operations(_queued(broker)) == ["op-1"]
    assert inflight.copies("op-2") == set()
    assert client.llen(broker.wakeups_key(QUEUE)) == 1
    assert _granting_keys(client, namespace) == []

    # When the first one ends, the throttle sends the second one's step, once
    throttle.release(broker, "op-1")
    assert _operations(_queued(broker)) == ["op-1", "op-2"]


def test_submit_sends_a_granted_operation_once_in_one_round_trip(broker, client, throttle):
    throttle.submit(broker, "op-0", [ThrottleScope("tenant:other", 1)], _first_steps("op-0", None))  # loads scripts
    trips = RoundTrips(client)
    assert throttle.submit(broker, "op-1", [ThrottleScope("tenant:c", 1)], _first_steps("op-1", None)) == "granted"
    assert trips.count == 1
    assert _operations(_queued(broker)) == ["op-0", "op-1"]


@pytest.mark.parametrize("lost", ["every script", "the broker's enqueue script"])
def test_scripts_the_server_lost_are_loaded_again_and_the_steps_sent_once(broker, client, throttle, lost):
    # Given a server that lost its scripts (a restart): all of them, or only the broker's
    scope = ThrottleScope("tenant:d", 2)
    assert throttle.submit(broker, "op-0", [scope], _first_steps("op-0", None)) == "granted"  # both loaded
    client.script_flush()
    if lost != "every script":
        client.script_load(throttle.store._scripts["acquire"].script)

    # When an operation is submitted, it is granted and its step is in the queue once
    assert throttle.submit(broker, "op-1", [scope], _first_steps("op-1", None)) == "granted"
    assert _operations(_queued(broker)) == ["op-0", "op-1"]


def test_a_broker_on_another_server_is_left_to_send_itself(client, namespace, throttle):
    # Given a broker whose messages live on another Redis server (here: another database of it)
    other = redis.Redis.from_url(os.environ["REDIS_URL"])
    other.connection_pool.connection_kwargs["db"] = (other.connection_pool.connection_kwargs.get("db", 0) + 1) % 16
    broker = JobsRedisBroker(client=other, namespace=namespace, middleware=[throttle], maintenance_chance=0)
    broker.declare_queue(QUEUE)
    try:
        # When an operation is admitted with its send, it is granted but not sent: the caller sends
        admission = throttle.admit(
            broker, "op-1", [ThrottleScope("tenant:e", 1)], _first_steps("op-1", None), send=True
        )
        assert (admission.status, admission.sent) == ("granted", False)
        assert other.llen(f"{namespace}:{QUEUE}") == 0
    finally:
        keys = list(other.scan_iter(f"{namespace}:*", count=1000))
        if keys:
            other.delete(*keys)
