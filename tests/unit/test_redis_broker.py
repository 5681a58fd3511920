"""JobsRedisBroker on a real Redis: malformed bodies are dead-lettered without disturbing the consumer,
and maintenance (putting a dead worker's messages back) runs on demand instead of by chance."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from jobs import redis_broker as module
from jobs.executors import InstanceCreateExecutor
from jobs.redis_broker import (
    BrokerMaintenance,
    JobsRedisBroker,
    JobsRedisConsumer,
    fail_malformed_operation,
    malformed_reason,
    preview,
)
from middleware.message_proxy import FieldsProxy
from resources.models import Instance, Operation
from tests.fixtures import make_instance, make_tenant, wait_for

QUEUE = "default"


class Calls:
    """Records on_malformed calls; thread-safe (the maintenance tests call from other threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, str, str]] = []

    def __call__(self, queue_name: str, message_id: str, operation_id: str, reason: str) -> None:
        with self.lock:
            self.calls.append((queue_name, message_id, operation_id, reason))


def _new_broker(calls: Calls | None = None, **parameters: Any) -> JobsRedisBroker:
    parameters.setdefault("url", os.environ["REDIS_URL"])
    return JobsRedisBroker(
        namespace=f"{os.environ['JOBS_NAMESPACE']}:rb-{uuid.uuid4().hex[:8]}",
        middleware=[],
        on_malformed=calls or Calls(),
        **parameters,
    )


def _forget(broker: JobsRedisBroker) -> None:
    keys = list(broker.client.scan_iter(f"{broker.namespace}:*", count=1000))
    if keys:
        broker.client.delete(*keys)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def broker(calls: Calls) -> Iterator[JobsRedisBroker]:
    broker = _new_broker(calls, maintenance_chance=0)  # no maintenance unless a test asks for it
    broker.declare_queue(QUEUE)
    try:
        yield broker
    finally:
        _forget(broker)


def _push_raw(broker: JobsRedisBroker, queue_name: str, message_id: str, body: bytes) -> None:
    """What dispatch.lua's enqueue does, without any of Dramatiq's encoding."""
    broker.client.hset(f"{broker.namespace}:{queue_name}.msgs", message_id, body)
    broker.client.rpush(f"{broker.namespace}:{queue_name}", message_id)


def _valid(queue_name: str = QUEUE, **options: Any) -> Message[Any]:
    return Message(queue_name=queue_name, actor_name="some_actor", args=(1, "two"), kwargs={"k": [3]}, options=options)


def _drain(consumer: JobsRedisConsumer, broker: JobsRedisBroker, timeout_s: float = 10.0) -> list[Any]:
    """Everything the consumer hands out until its queue is empty and nothing fetched is pending; each is
    acknowledged at once, as a worker does once it has processed it (a full prefetch fetches nothing)."""
    handed_out = []
    queue_key = f"{broker.namespace}:{consumer.queue_name}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            handed_out.append(message)
            consumer.ack(message)
            continue
        idle = not (consumer._unchecked or consumer._rejects or consumer.message_cache)
        if idle and broker.client.llen(queue_key) == 0:
            return handed_out
    raise AssertionError(f"the consumer did not drain its queue in {timeout_s} s")


def _dead_letters(broker: JobsRedisBroker, queue_name: str = QUEUE) -> dict[str, bytes]:
    ids = [i.decode() for i in broker.client.zrange(f"{broker.namespace}:{queue_name}.XQ", 0, -1)]
    bodies = broker.client.hgetall(f"{broker.namespace}:{queue_name}.XQ.msgs")
    return {i: bodies[i.encode()] for i in ids}


def _acks(broker: JobsRedisBroker, queue_name: str = QUEUE) -> set[bytes]:
    return broker.client.smembers(f"{broker.namespace}:__acks__.{broker.broker_id}.{queue_name}")


# -- malformed bodies -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
not_a_list = json_values.filter(lambda v: not isinstance(v, list))
not_a_dict = json_values.filter(lambda v: not isinstance(v, dict))
not_a_name = json_values.filter(lambda v: not isinstance(v, str) or v == "")
not_a_number = json_values.filter(lambda v: v is None or isinstance(v, bool) or not isinstance(v, int | float))

DROP = object()

#: One change that makes a well-formed message body malformed: (field path, new value, or DROP).
breakages = st.one_of(
    st.sampled_from(["queue_name", "actor_name", "args", "kwargs", "options"]).map(lambda f: ((f,), DROP)),
    st.just((("options", "redis_message_id"), DROP)),
    json_values.filter(lambda v: v != QUEUE).map(lambda v: (("queue_name",), v)),
    not_a_name.map(lambda v: (("actor_name",), v)),
    not_a_list.map(lambda v: (("args",), v)),
    not_a_dict.map(lambda v: (("kwargs",), v)),
    not_a_dict.map(lambda v: (("options",), v)),
    not_a_name.map(lambda v: (("options", "redis_message_id"), v)),
    # a well-formed id that is not the one the body is stored under
    st.uuids().map(lambda v: (("options", "redis_message_id"), str(v))),
    not_a_name.map(lambda v: (("message_id",), v)),
    not_a_number.map(lambda v: (("message_timestamp",), v)),
    not_a_number.filter(lambda v: v is not None).map(lambda v: (("options", "eta"), v)),
    json_values.map(lambda v: (("surprise",), v)),
)


@st.composite
def almost_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """A body shaped like a message of QUEUE, stored under its own id, with one thing wrong."""
    redis_message_id = str(uuid.uuid4())
    options: dict[str, Any] = {"redis_message_id": redis_message_id}
    if draw(st.booleans()):
        options["operation_id"] = draw(st.text(min_size=1, max_size=12) | json_values)
    fields = _valid(**options).asdict()
    fields["args"] = list(fields["args"])
    path, value = draw(breakages)
    target = fields if len(path) == 1 else fields[path[0]]
    if value is DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return redis_message_id, json.dumps(fields).encode()


bad_bodies = st.one_of(
    st.tuples(st.uuids().map(str), st.binary(max_size=300)),
    st.tuples(st.uuids().map(str), json_values.map(lambda v: json.dumps(v).encode())),
    almost_messages(),
)


def _expected_operation(body: bytes) -> str | None:
    """The operation id a bad body names, read the way the project's encoder reads it."""
    try:
        fields = json.loads(body.decode("utf-8"))
    except ValueError:
        return None
    options = fields.get("options") if isinstance(fields, dict) else None
    operation_id = options.get("operation_id") if isinstance(options, dict) else None
    return operation_id if isinstance(operation_id, str) and operation_id else None


@settings(
    max_examples=150,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(bad=st.lists(bad_bodies, min_size=1, max_size=5), position=st.integers(0, 5), prefetch=st.integers(1, 8))
def test_bad_bodies_are_dead_lettered_and_the_good_message_still_comes_through(bad, position, prefetch):
    calls = Calls()
    broker = _new_broker(calls, maintenance_chance=0)
    try:
        # Given bad bodies pushed straight into a queue, around one valid message
        good_index = min(position, len(bad))
        for index in range(len(bad) + 1):
            if index == good_index:
                good = broker.enqueue(_valid())
            else:
                message_id, body = bad[index if index < good_index else index - 1]
                _push_raw(broker, QUEUE, message_id, body)

        # When a consumer reads the queue (it never raises)
        consumer = broker.consume(QUEUE, prefetch=prefetch, timeout=5)
        handed_out = _drain(consumer, broker)

        # Then exactly the valid message is handed out
        assert [m.message_id for m in handed_out] == [good.message_id]
        assert handed_out[0].options["redis_message_id"] == good.options["redis_message_id"]
        # ... every bad body is in the dead-letter queue under its own id
        assert _dead_letters(broker) == dict(bad)
        # ... the operations named by bad bodies were told, with the dead-lettered id
        expected = sorted((mid, op) for mid, body in bad if (op := _expected_operation(body)) is not None)
        assert sorted((mid, op) for _q, mid, op, _reason in calls.calls) == expected
        # ... and once the valid one is acknowledged, nothing is left in this worker's ack set or queue
        assert _acks(broker) == set()
        assert broker.client.hlen(f"{broker.namespace}:{QUEUE}.msgs") == 0
    finally:
        _forget(broker)


def test_a_bad_body_is_logged_with_queue_id_error_and_a_clipped_printable_preview(broker, caplog):
    # Given a body of random bytes, long and with control characters
    body = b"\xff\x00\x1b[2J" + b"x" * 1000
    _push_raw(broker, QUEUE, "bad-1", body)

    # When it is consumed
    with caplog.at_level(logging.ERROR, logger="jobs.redis_broker"):
        assert _drain(broker.consume(QUEUE, prefetch=2, timeout=5), broker) == []

    # Then one ERROR names the queue, the id and the decode error, and shows a short printable preview
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    text = record.getMessage()
    assert "queue default" in text and "bad-1" in text
    assert "UnicodeDecodeError" in text
    body_preview = text.split("Body: ", 1)[1]
    assert body_preview.isprintable() and len(body_preview) < 230
    assert body_preview.startswith("\\xff\\x00\\x1b[2J")
    assert _dead_letters(broker) == {"bad-1": body}


def test_on_malformed_gets_the_operation_id_of_a_readable_but_malformed_message(broker, calls):
    # Given a message of an operation whose body lost its redis_message_id (Dramatiq would crash on ack)
    fields = _valid(operation_id="op-123", plan_node="0").asdict()
    _push_raw(broker, QUEUE, "bad-2", json.dumps(fields).encode())
    # ... and one that is not even JSON, which names no operation
    _push_raw(broker, QUEUE, "bad-3", b"{not json")

    # When they are consumed
    assert _drain(broker.consume(QUEUE, prefetch=4, timeout=5), broker) == []

    # Then the callback got the operation, the dead-lettered id and why
    assert calls.calls == [(QUEUE, "bad-2", "op-123", "its options have no redis_message_id (got None)")]
    assert set(_dead_letters(broker)) == {"bad-2", "bad-3"}


def test_a_failing_on_malformed_does_not_stop_the_consumer(calls):
    def explode(*_args: Any) -> None:
        raise RuntimeError("database down")

    broker = _new_broker(maintenance_chance=0)
    broker.on_malformed = explode
    try:
        _push_raw(broker, QUEUE, "bad-4", json.dumps({"options": {"operation_id": "op-9"}}).encode())
        good = broker.enqueue(_valid())
        handed_out = _drain(broker.consume(QUEUE, prefetch=1, timeout=5), broker)
        assert [m.message_id for m in handed_out] == [good.message_id]
        assert set(_dead_letters(broker)) == {"bad-4"}
    finally:
        _forget(broker)


def test_a_message_of_another_queue_is_dead_lettered(broker):
    # A worker thread finds its consumer by the message's queue name; an unknown one would kill it.
    stray = _valid(queue_name="elsewhere", redis_message_id="bad-5")
    _push_raw(broker, QUEUE, "bad-5", stray.encode())
    assert _drain(broker.consume(QUEUE, prefetch=1, timeout=5), broker) == []
    assert set(_dead_letters(broker)) == {"bad-5"}


def test_delayed_messages_are_checked_against_their_delay_queue(broker):
    # Given a valid delayed message (its queue name is the delay queue's)
    delayed = broker.enqueue(_valid(), delay=60_000)
    # When the delay queue's consumer reads it, it is handed out as is
    handed_out = _drain(broker.consume(f"{QUEUE}.DQ", prefetch=4, timeout=5), broker)
    assert [m.message_id for m in handed_out] == [delayed.message_id]


def test_messages_are_handed_out_as_fields_proxies(broker):
    # Given a valid message in the queue
    sent = broker.enqueue(_valid())
    # When the consumer hands it out, its fields are the proxy's own attributes (see middleware.message_proxy)
    handed_out = _drain(broker.consume(QUEUE, prefetch=4, timeout=5), broker)
    assert [type(m) for m in handed_out] == [FieldsProxy]
    assert handed_out[0].message_id == sent.message_id and "options" in vars(handed_out[0])


def test_identical_bad_bodies_each_go_to_the_dead_letter_queue(broker):
    for index in range(3):
        _push_raw(broker, QUEUE, f"same-{index}", b"garbage")
    assert _drain(broker.consume(QUEUE, prefetch=3, timeout=5), broker) == []
    assert _dead_letters(broker) == {f"same-{i}": b"garbage" for i in range(3)}
    assert _acks(broker) == set()


def test_closing_a_consumer_puts_its_prefetched_messages_back(broker):
    # Given three messages, one handed out and two waiting in the consumer's cache
    sent = [broker.enqueue(_valid()) for _ in range(3)]
    consumer = broker.consume(QUEUE, prefetch=3, timeout=5)
    first = wait_for(lambda: next(consumer), timeout_s=10)
    assert len(consumer.message_cache) == 2

    # When the consumer is closed (Dramatiq does so after an error, or at shutdown)
    consumer.close()

    # Then the two are back in the queue, not stranded in this worker's ack set
    queued = broker.client.lrange(f"{broker.namespace}:{QUEUE}", 0, -1)
    assert {q.decode() for q in queued} == {m.options["redis_message_id"] for m in sent[1:]}
    assert _acks(broker) == {first.options["redis_message_id"].encode()}


def test_malformed_reason_accepts_what_dramatiq_encodes():
    message = _valid(redis_message_id="x", eta=123)
    assert malformed_reason(json.loads(message.encode()), QUEUE) is None
    assert malformed_reason([], QUEUE) == "it is a JSON list, not a message object"


def test_preview_is_printable_and_clipped():
    assert preview(b"ok\n\x00") == "ok\\n\\x00"
    clipped = preview("é" * 500)
    assert clipped.startswith("é" * 200) and clipped.endswith("(500 chars)")
    assert preview(None) == "<no body>"


def test_the_default_on_malformed_fails_the_operation(stub_broker, cloud):
    # Given a running operation (nothing consumes its messages)
    instance = make_instance(make_tenant(), "vm-unreadable", volumes=1)
    handle = InstanceCreateExecutor.execute(instance)
    stub_broker.flush_all()

    # When its message is found unreadable and dead-lettered
    fail_malformed_operation(stub_broker, QUEUE, "rid-1", handle.id, "it does not decode: JSONDecodeError: x")

    # Then the operation failed, naming the message, and the resources' failure callbacks were sent
    assert handle.status() == "failed"
    from resources.db import session_scope

    with session_scope() as session:
        operation = session.get(Operation, handle.id)
        assert operation.error_message == (
            "message rid-1 on queue default could not be read (it does not decode: JSONDecodeError: x); "
            "it was dead-lettered"
        )
        erred = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        assert "rid-1" in erred.error_message
    assert stub_broker.queues[QUEUE].qsize() >= 1  # the failure callbacks


def test_the_default_on_malformed_never_raises(monkeypatch, caplog):
    def database_down(*_args: Any, **_kwargs: Any) -> bool:
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(module, "end_operation", database_down)
    with caplog.at_level(logging.ERROR, logger="jobs.redis_broker"):
        fail_malformed_operation(StubBroker(), QUEUE, "rid-2", "op-2", "reason")
    assert "could not fail operation op-2" in caplog.text


# -- maintenance ----------------------------------------------------------------------------------------


def _dead_worker(broker: JobsRedisBroker, queue_name: str, message_id: str) -> str:
    """A worker that fetched ``message_id`` from ``queue_name`` and then stopped beating, long ago."""
    worker_id = f"dead-{uuid.uuid4().hex[:8]}"
    broker.client.hset(f"{broker.namespace}:{queue_name}.msgs", message_id, _valid(queue_name).encode())
    broker.client.sadd(f"{broker.namespace}:__acks__.{worker_id}.{queue_name}", message_id)
    long_ago_ms = int(time.time() * 1000) - 10 * broker.heartbeat_timeout
    broker.client.zadd(f"{broker.namespace}:__heartbeats__", {worker_id: long_ago_ms})
    return worker_id


def _queued(broker: JobsRedisBroker, queue_name: str) -> list[str]:
    return [i.decode() for i in broker.client.lrange(f"{broker.namespace}:{queue_name}", 0, -1)]


def test_without_forced_maintenance_a_dead_workers_message_stays_put(broker):
    # The control: with maintenance_chance=0 the random path never runs.
    _dead_worker(broker, QUEUE, "m-0")
    for name in broker.maintenance_queues():
        broker.do_qsize(name)
    assert _queued(broker, QUEUE) == []


def test_run_maintenance_puts_a_dead_workers_messages_back_now(broker):
    # Given a dead worker holding one message of the queue and one of its delay queue
    worker_id = _dead_worker(broker, QUEUE, "m-1")
    _dead_worker(broker, f"{QUEUE}.DQ", "m-2")

    # When maintenance runs for every declared queue
    broker.run_maintenance()

    # Then both are back in their queues, the dead worker's ack sets and heartbeat are gone
    assert _queued(broker, QUEUE) == ["m-1"]
    assert _queued(broker, f"{QUEUE}.DQ") == ["m-2"]
    assert not broker.client.exists(f"{broker.namespace}:__acks__.{worker_id}.{QUEUE}")
    assert broker.client.zscore(f"{broker.namespace}:__heartbeats__", worker_id) is None
    # ... and only that call was forced: the random chance is back for everything else
    assert broker._should_do_maintenance("fetch") == 0


def test_the_maintenance_middleware_recovers_within_its_interval(broker):
    # Given a worker process's maintenance thread beating every 50 ms
    middleware = BrokerMaintenance(0.05)
    middleware.after_worker_boot(broker, None)
    try:
        # When a worker dies holding a message
        _dead_worker(broker, QUEUE, "m-3")
        # Then the message is back in its queue without any luck involved
        wait_for(lambda: _queued(broker, QUEUE) == ["m-3"], timeout_s=10)
    finally:
        middleware.after_worker_shutdown(broker, None)
    assert middleware._thread is None


def test_the_maintenance_middleware_does_nothing_on_other_brokers():
    middleware = BrokerMaintenance(0.05)
    middleware.after_worker_boot(StubBroker(), None)
    assert middleware._thread is None


def test_the_maintenance_thread_survives_redis_errors(caplog):
    # Given a broker whose Redis refuses connections
    unreachable = _new_broker(url="redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    unreachable.declare_queue(QUEUE)
    middleware = BrokerMaintenance(0.05)
    with caplog.at_level(logging.WARNING, logger="jobs.redis_broker"):
        middleware.after_worker_boot(unreachable, None)
        try:
            # Then each failed run is a warning, and the thread keeps trying
            wait_for(lambda: caplog.text.count("broker maintenance failed") >= 2, timeout_s=30)
            assert middleware._thread is not None and middleware._thread.is_alive()
        finally:
            middleware.after_worker_shutdown(unreachable, None)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "jobs.redis_broker")


def test_redis_errors_while_dead_lettering_keep_the_fetched_batch(broker, monkeypatch):
    # Given a fetched batch with a bad body whose dead-lettering fails once on a connection error
    _push_raw(broker, QUEUE, "bad-1", b"not json")
    good = broker.enqueue(_valid())
    consumer = broker.consume(QUEUE, prefetch=2, timeout=5)
    real_nack = broker.do_nack
    failures = iter([redis.ConnectionError("gone for a moment")])

    def flaky_nack(*args):
        for error in failures:
            raise error
        return real_nack(*args)

    monkeypatch.setattr(broker, "do_nack", flaky_nack)

    # When the consumer goes on, it dead-letters the bad body and hands the message out once Redis answers
    handed_out = _drain(consumer, broker)
    assert [m.message_id for m in handed_out] == [good.message_id]
    assert _dead_letters(broker) == {"bad-1": b"not json"}
    assert _acks(broker) == set()


def test_a_copy_stored_under_another_id_than_it_names_is_dead_lettered(broker):
    # Given a message stored under an id other than the one it names (its ack would remove the wrong id)
    message = broker.enqueue(_valid())
    stored_under = message.options["redis_message_id"]
    body = broker.client.hget(broker.bodies_key(QUEUE), stored_under)
    _push_raw(broker, QUEUE, "elsewhere", body)

    # When the consumer fetches both, the one under the wrong id is dead-lettered, the other handed out
    handed_out = _drain(broker.consume(QUEUE, prefetch=4, timeout=5), broker)
    assert [m.options["redis_message_id"] for m in handed_out] == [stored_under]
    assert _dead_letters(broker) == {"elsewhere": body}
    assert _acks(broker) == set()


def test_the_project_broker_is_a_jobs_redis_broker_with_maintenance(monkeypatch):
    monkeypatch.delenv("JOBS_BROKER")
    from jobs.broker import build_broker

    built = build_broker()
    assert isinstance(built, JobsRedisBroker)
    assert any(isinstance(m, BrokerMaintenance) for m in built.middleware)
    assert dramatiq.get_broker() is not built  # building does not change the global broker


def test_a_consumer_thread_survives_redis_failing_while_it_moves_and_puts_back_delayed_messages(broker):
    # Given a worker holding two delayed messages in memory, one due soon and one later
    processed: list[str] = []
    dramatiq.actor(lambda tag: processed.append(tag), broker=broker, actor_name="record", queue_name=QUEUE)
    worker = dramatiq.Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        real_enqueue, real_requeue = broker.enqueue, broker.do_requeue
        failures = {"enqueue": 1, "requeue": 1}

        def enqueue(message: Message[Any], *, delay: int | None = None) -> Message[Any]:
            # The first due delayed message the worker moves to its queue meets Redis down ...
            if message.queue_name == QUEUE and "eta" not in message.options and failures["enqueue"]:
                failures["enqueue"] -= 1
                raise redis.ConnectionError("Redis went away")
            return real_enqueue(message, delay=delay)

        def do_requeue(queue_name: str, *ids: str) -> Any:
            # ... and so does the worker's attempt to put the other one back as it closes the consumer
            if failures["requeue"]:
                failures["requeue"] -= 1
                raise redis.ConnectionError("Redis still away")
            return real_requeue(queue_name, *ids)

        broker.enqueue = enqueue  # type: ignore[method-assign]
        broker.do_requeue = do_requeue  # type: ignore[method-assign]
        real_enqueue(Message(queue_name=QUEUE, actor_name="record", args=("soon",), kwargs={}, options={}), delay=50)
        real_enqueue(Message(queue_name=QUEUE, actor_name="record", args=("later",), kwargs={}, options={}), delay=800)

        # Then once Redis answers, both still run: the consumer thread lived on and put back what it had lost
        wait_for(lambda: sorted(processed) == ["later", "soon"], timeout_s=20)
        assert failures == {"enqueue": 0, "requeue": 0}
        wait_for(lambda: _acks(broker, "default.DQ") == set(), timeout_s=10)
    finally:
        worker.stop()


def test_acks_still_work_after_the_server_lost_its_scripts(calls):
    # Given a broker on the project's client (each thread's own connection), a message handed out, and a Redis that
    # then lost its scripts (as after a restart)
    from resources.redis_client import ThreadConnections

    client = ThreadConnections(redis.ConnectionPool.from_url(os.environ["REDIS_URL"]))
    broker = _new_broker(calls, client=client, maintenance_chance=0)
    broker.declare_queue(QUEUE)
    try:
        sent = broker.enqueue(_valid())
        consumer = broker.consume(QUEUE, prefetch=1, timeout=5)
        handed_out = wait_for(lambda: next(consumer), timeout_s=10)
        broker.client.script_flush()

        # When the worker acknowledges it, and the next message is fetched
        consumer.ack(handed_out)
        again = broker.enqueue(_valid())

        # Then the scripts were loaded again on the way: the first is gone from the ack set, the next comes through
        assert handed_out.message_id == sent.message_id
        assert wait_for(lambda: next(consumer), timeout_s=10).message_id == again.message_id
        assert _acks(broker) == {again.options["redis_message_id"].encode()}
    finally:
        _forget(broker)
        client.connection_pool.disconnect()
