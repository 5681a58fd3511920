"""The in-flight names of an operation's copies: added before each send; on the Redis broker kept through the
acknowledgement (the janitor asks the broker about each name) and dropped with the operation's end."""

from __future__ import annotations

from typing import Any

import dramatiq
import redis
from dramatiq import Message

from jobs.broker import broker as project_broker
from jobs.executors import InstanceCreateExecutor
from jobs.redis_broker import JobsRedisBroker
from middleware import find_inflight
from middleware.inflight import Copy
from middleware.plan import OPTION_NODE, OPTION_OPERATION
from resources.models import OperationStatus, new_uuid
from scheduler.janitor import is_alive
from tests.fixtures import make_instance, make_tenant, wait_for


class NoRedis:
    """A client that fails the test if it is used."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was called ({name})")


def step_of(operation_id: str) -> Message[Any]:
    return Message(
        "default", "backend_method", ("instance:abc", "update"), {}, {OPTION_OPERATION: operation_id, OPTION_NODE: "0"}
    )


def test_acknowledging_a_copy_on_the_redis_broker_costs_no_round_trip_and_leaves_it_gone(
    redis_broker: JobsRedisBroker, monkeypatch
):
    # Given the one copy of an operation's step, queued on the Redis broker, fetched and acknowledged
    operation_id = new_uuid()
    inflight = find_inflight(redis_broker)
    assert inflight is not None
    queued = redis_broker.enqueue(step_of(operation_id))
    assert redis_broker.do_fetch("default", 10)
    redis_broker.do_ack("default", queued.options["redis_message_id"])

    # When the in-flight tracking hears of the acknowledgement
    client = inflight.client
    monkeypatch.setattr(inflight, "_client", NoRedis())
    inflight.after_ack(redis_broker, queued)
    monkeypatch.setattr(inflight, "_client", client)

    # Then it asked Redis nothing, and the janitor, asking the broker about the name left, finds nothing alive
    assert len(inflight.copies(operation_id)) == 1
    assert not is_alive(redis_broker, operation_id)


def test_on_the_redis_broker_a_copy_is_named_in_the_round_trip_of_its_enqueue(redis_broker, monkeypatch):
    # Given the in-flight tracking on the broker's Redis server, unable to make a round trip of its own
    operation_id = new_uuid()
    inflight = find_inflight(redis_broker)
    assert inflight is not None
    client = inflight.client
    monkeypatch.setattr(inflight, "_client", NoRedis())
    monkeypatch.setattr(redis_broker, "shares_server", lambda other: True)

    # When a step of an operation is enqueued
    queued = redis_broker.enqueue(step_of(operation_id))

    # Then its name is in the operation's set, its message in the queue, and its set expires
    monkeypatch.setattr(inflight, "_client", client)
    assert [Copy.parse(name) for name in inflight.copies(operation_id)] == [Copy.of(queued)]
    assert redis_broker.stores("default", queued.options["redis_message_id"])
    assert client.ttl(inflight.keys_of(operation_id)[0]) > 0


def test_a_name_asked_for_one_enqueue_is_not_added_with_another(redis_broker):
    # Given a name asked for with a message whose enqueue then did not happen (a later hook refused it)
    operation_id = new_uuid()
    inflight = find_inflight(redis_broker)
    assert inflight is not None
    refused = step_of(operation_id).copy(options={"redis_message_id": "refused"})
    assert redis_broker.add_on_enqueue(refused, inflight.client, inflight.keys_of(operation_id)[0], "name", 60)

    # When another message, of no operation, is enqueued in this thread
    other = redis_broker.enqueue(Message("default", "backend_method", (), {}, {}))

    # Then it is queued alone: the name stays out
    assert redis_broker.stores("default", other.options["redis_message_id"])
    assert inflight.copies(operation_id) == set()


def test_a_tracking_client_on_another_redis_server_names_copies_itself(redis_broker):
    inflight = find_inflight(redis_broker)
    assert inflight is not None
    pool = inflight.client.connection_pool
    db = (pool.connection_kwargs.get("db") or 0) + 1
    elsewhere = redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **{**pool.connection_kwargs, "db": db}
        )
    )

    assert redis_broker.add_on_enqueue(step_of(new_uuid()), inflight.client, "key", "name", 60) is False  # no redis id
    message = step_of(new_uuid()).copy(options={"redis_message_id": "x"})
    assert redis_broker.add_on_enqueue(message, elsewhere, "key", "name", 60) is False
    assert redis_broker.add_on_enqueue(message, inflight.client, "key", "name", 60) is True


def test_a_copy_the_broker_cannot_be_asked_about_is_forgotten_on_its_acknowledgement(redis_broker):
    # Given a copy named without a broker id (as on RabbitMQ, whose queues cannot be asked about one message)
    operation_id = new_uuid()
    inflight = find_inflight(redis_broker)
    assert inflight is not None
    copy = step_of(operation_id)
    inflight.before_enqueue(redis_broker, copy, None)
    assert len(inflight.copies(operation_id)) == 1

    # When it is acknowledged, its name goes: the janitor would take it as it is
    inflight.after_ack(redis_broker, copy)
    assert inflight.copies(operation_id) == set()


def test_an_operation_run_on_the_redis_broker_leaves_no_in_flight_names_behind(redis_broker, cloud):
    # Given an operation that sends some steps (its volumes' group) and chains others, run by a real worker on
    # the Redis broker
    inflight = find_inflight(redis_broker)
    assert inflight is not None
    for actor in project_broker.actors.values():
        redis_broker.declare_actor(actor)
    worker = dramatiq.Worker(redis_broker, worker_timeout=20, worker_threads=2)
    worker.start()
    try:
        handle = InstanceCreateExecutor.execute(make_instance(make_tenant(), volumes=2))
        assert handle.wait(timeout=60).status == OperationStatus.SUCCEEDED

        # Then once its last message is acknowledged, none of its names is left (they would stay for days)
        wait_for(
            lambda: (
                redis_broker.client.scard(f"{redis_broker.namespace}:__acks__.{redis_broker.broker_id}.default") == 0
            ),
            timeout_s=30,
        )
        assert inflight.copies(handle.id) == set()
        assert inflight.sent(handle.id) == set()
    finally:
        worker.stop()
