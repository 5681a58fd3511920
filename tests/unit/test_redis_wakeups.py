"""Idle consumers of the project's Redis broker wait for a wake-up instead of polling (real Redis)."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.redis_broker import JobsRedisBroker
from tests.fixtures import wait_for

QUEUE = "default"
#: Longer than any of these tests may take: a wait that is not cut short fails the test.
LONG_WAIT_MS = 120_000


def _new_broker(socket_timeout: float | None = None) -> JobsRedisBroker:
    # No read timeout by default (redis-py's is 5 s): waits here last as long as they are asked to.
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=socket_timeout)
    broker = JobsRedisBroker(
        client=client,
        namespace=f"{os.environ['JOBS_NAMESPACE']}:wake-{uuid.uuid4().hex[:8]}",
        middleware=[],
        maintenance_chance=0,
    )
    broker.declare_queue(QUEUE)
    return broker


def _forget(broker: JobsRedisBroker) -> None:
    keys = list(broker.client.scan_iter(f"{broker.namespace}:*", count=1000))
    if keys:
        broker.client.delete(*keys)


@pytest.fixture
def broker() -> Iterator[JobsRedisBroker]:
    broker = _new_broker()
    try:
        yield broker
    finally:
        _forget(broker)


def _message(tag: str = "x") -> Message[Any]:
    return Message(queue_name=QUEUE, actor_name="record", args=(tag,), kwargs={}, options={})


def _blocked_clients(broker: JobsRedisBroker) -> int:
    """Clients of the server blocked in a command (BLPOP) right now."""
    return int(broker.client.info("clients")["blocked_clients"])


class _InThread:
    """One call in a daemon thread (a wait that is never cut short must not hang the run)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result = call()
            except BaseException as error:
                self.error = error
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def wait(self, timeout_s: float = 10) -> Any:
        assert self.done.wait(timeout_s), "the call was still waiting"
        if self.error is not None:
            raise self.error
        return self.result


def _another_worker(broker: JobsRedisBroker) -> JobsRedisBroker:
    """The broker of another worker process on the same queues."""
    other = _new_broker()
    other.namespace = broker.namespace
    return other


def _waiting_consumer(broker: JobsRedisBroker, prefetch: int) -> tuple[Any, _InThread]:
    """Another worker's consumer of the (empty) queue, and its call to ``next``, once it is blocked in Redis."""
    waiting = _another_worker(broker).consume(QUEUE, prefetch=prefetch, timeout=LONG_WAIT_MS)
    before = _blocked_clients(broker)
    call = _InThread(lambda: next(waiting))
    wait_for(lambda: _blocked_clients(broker) > before, timeout_s=10)
    return waiting, call


def test_an_idle_consumer_blocks_in_redis_until_a_message_is_enqueued_and_then_hands_it_out(broker):
    # Given a consumer of an empty queue whose wait would last two minutes
    consumer = broker.consume(QUEUE, prefetch=2, timeout=LONG_WAIT_MS)
    before = _blocked_clients(broker)
    call = _InThread(lambda: next(consumer))

    # When it is blocked in Redis (not polling) and a message is enqueued
    wait_for(lambda: _blocked_clients(broker) > before, timeout_s=10)
    sent = broker.enqueue(_message())

    # Then that same call returns the message
    received = call.wait()
    assert received is not None and received.message_id == sent.message_id
    consumer.ack(received)


def test_an_idle_worker_runs_a_new_message_while_its_consumers_wait(broker):
    # Given a real Dramatiq worker, idle, its consumers (queue and delay queue) blocked in Redis
    processed: list[str] = []
    dramatiq.actor(lambda tag: processed.append(tag), broker=broker, actor_name="record", queue_name=QUEUE)
    before = _blocked_clients(broker)
    worker = dramatiq.Worker(broker, worker_timeout=1000, worker_threads=1)
    worker.start()
    try:
        wait_for(lambda: _blocked_clients(broker) >= before + 2, timeout_s=10)

        # When a message and a delayed one are sent
        broker.enqueue(_message("now"))
        broker.enqueue(_message("soon"), delay=50)

        # Then both run
        wait_for(lambda: sorted(processed) == ["now", "soon"], timeout_s=20)
    finally:
        worker.stop()


def test_a_consumer_that_emptied_the_queue_waits_for_a_wake_up_without_fetching_again(broker, monkeypatch):
    # Given a consumer that counts its fetches, and one message queued
    fetches: list[int] = []
    fetch = broker.fetch
    monkeypatch.setattr(broker, "fetch", lambda queue, count: fetches.append(count) or fetch(queue, count))
    consumer = broker.consume(QUEUE, prefetch=2, timeout=LONG_WAIT_MS)
    first = broker.enqueue(_message("1"))

    # When it hands that message out (its fetch took fewer than it asked for) and is asked for the next one
    assert next(consumer).message_id == first.message_id
    assert len(fetches) == 1
    before = _blocked_clients(broker)
    call = _InThread(lambda: next(consumer))

    # Then it blocks in Redis with no fetch in between, and the next enqueue's token gets it the message
    wait_for(lambda: _blocked_clients(broker) > before, timeout_s=10)
    assert len(fetches) == 1
    second = broker.enqueue(_message("2"))
    assert call.wait().message_id == second.message_id
    assert len(fetches) == 2


def test_a_consumer_whose_wait_was_in_vain_fetches_before_it_waits_again(broker):
    # Given a consumer that emptied the queue, then waited in vain
    consumer = broker.consume(QUEUE, prefetch=2, timeout=200)
    broker.enqueue(_message("1"))
    assert next(consumer) is not None
    assert next(consumer) is None

    # When a message is queued without a wake-up token (as a server that lost its tokens would have it)
    broker.enqueue(_message("2"))
    broker.client.delete(broker.wakeups_key(QUEUE))

    # Then the next call finds it
    received = next(consumer)
    assert received is not None and received.args == ("2",)


def test_a_wait_ends_when_a_held_delayed_message_is_due(broker):
    # Given a delay-queue consumer holding one delayed message, with a wait that would last two minutes
    broker.enqueue(_message(), delay=200)
    consumer = broker.consume(f"{QUEUE}.DQ", prefetch=4, timeout=LONG_WAIT_MS)
    delayed = wait_for(lambda: next(consumer), timeout_s=10)
    assert "eta" in delayed.options

    # When it is asked for more, the delay queue being empty
    call = _InThread(lambda: next(consumer))

    # Then it gives up its wait when the message is due (for the worker to move it), not after two minutes
    assert call.wait(timeout_s=30) is None
    consumer.ack(delayed)


def test_a_full_consumer_looks_again_as_soon_as_a_worker_finishes_a_message(broker):
    # Given a consumer with no room left (prefetch 1, one message handed out) and another message queued
    first, second = broker.enqueue(_message("1")), broker.enqueue(_message("2"))
    consumer = broker.consume(QUEUE, prefetch=1, timeout=LONG_WAIT_MS)
    handed_out = wait_for(lambda: next(consumer), timeout_s=10)
    assert handed_out.message_id == first.message_id
    call = _InThread(lambda: next(consumer))

    # When a worker thread finishes the first one
    consumer.ack(handed_out)

    # Then the waiting call returns, and the next one hands out the second message
    assert call.wait() is None
    assert next(consumer).message_id == second.message_id


def test_messages_a_closing_consumer_puts_back_wake_a_waiting_consumer(broker):
    # Given a worker's consumer holding two messages (one handed out, one prefetched) ...
    broker.enqueue(_message("1"))
    broker.enqueue(_message("2"))
    closing = broker.consume(QUEUE, prefetch=2, timeout=LONG_WAIT_MS)
    handed_out = wait_for(lambda: next(closing), timeout_s=10)
    # ... and another worker's consumer waiting on the empty queue
    waiting, call = _waiting_consumer(broker, prefetch=2)

    # When the first consumer closes (an error, a shutdown) and puts its prefetched message back
    closing.close()

    # Then the waiting consumer gets it at once
    received = call.wait()
    assert received is not None and received.message_id != handed_out.message_id
    waiting.ack(received)


def test_messages_maintenance_puts_back_wake_a_waiting_consumer(broker):
    # Given a worker that fetched a message and died (its heartbeat long stale) ...
    dead = _another_worker(broker)
    sent = broker.enqueue(_message())
    assert [message_id for message_id, _ in dead.fetch(QUEUE, 1)] == [sent.options["redis_message_id"].encode()]
    long_ago_ms = int(time.time() * 1000) - 10 * broker.heartbeat_timeout
    broker.client.zadd(f"{broker.namespace}:__heartbeats__", {dead.broker_id: long_ago_ms})
    # ... and another worker's consumer waiting on the queue, empty now
    waiting, call = _waiting_consumer(broker, prefetch=1)

    # When maintenance puts the dead worker's message back
    broker.run_maintenance()

    # Then the waiting consumer gets it at once, and no token is left over
    received = call.wait()
    assert received is not None and received.message_id == sent.message_id
    waiting.ack(received)
    assert broker.client.llen(broker.wakeups_key(QUEUE)) == 0


def test_a_top_up_pushes_only_the_missing_tokens_and_at_most_its_cap(broker, monkeypatch):
    # Messages with tokens get no more; messages put in the list by hand get theirs, up to the cap
    broker.enqueue(_message())
    assert broker.top_up_wakeups(QUEUE) == 0
    monkeypatch.setattr("jobs.redis_broker.TOP_UP_MAX", 3)
    broker.client.rpush(f"{broker.namespace}:{QUEUE}", *[f"by-hand-{i}" for i in range(5)])
    assert broker.top_up_wakeups(QUEUE) == 3
    assert broker.top_up_wakeups(QUEUE) == 2
    assert broker.client.llen(broker.wakeups_key(QUEUE)) == 6


def test_a_client_timeout_shorter_than_the_wait_ends_the_wait_instead_of_failing(broker):
    # Given a broker whose Redis client times out reads after 0.3 s, and a consumer waiting up to 2 minutes
    impatient = _new_broker(socket_timeout=0.3)
    consumer = impatient.consume(QUEUE, prefetch=1, timeout=LONG_WAIT_MS)

    # When it waits on the empty queue, its wait ends with nothing rather than an error
    assert _InThread(lambda: next(consumer)).wait() is None

    # And a message sent afterwards is still handed out
    sent = impatient.enqueue(_message())
    assert wait_for(lambda: next(consumer), timeout_s=10).message_id == sent.message_id
    _forget(impatient)


def test_a_wait_stays_within_the_clients_read_timeout(broker):
    # Given a client that gives up on a reply after 0.3 s
    impatient = _new_broker(socket_timeout=0.3)
    connection_before = impatient.client.client_id()

    # When a consumer would wait a minute, the wait ends in time: the connection was not dropped
    assert impatient.wait_for_enqueue(QUEUE, 60) is False
    assert impatient.client.client_id() == connection_before


def test_a_wait_that_outlasts_the_read_timeout_anyway_ends_empty_instead_of_failing(broker):
    # Given a client that gives up after 0.3 s, but a broker that does not know it (as when Redis ends a
    # blocked command up to 1/hz s late)
    impatient = _new_broker(socket_timeout=0.3)
    impatient.read_timeout_s = None

    # When a consumer waits a minute, the client's timeout ends the wait as if it were over
    assert impatient.wait_for_enqueue(QUEUE, 60) is False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(st.just(0), st.integers(min_value=1, max_value=4)), min_size=1, max_size=25))
def test_wake_up_tokens_match_the_queued_messages(broker: JobsRedisBroker, steps: list[int]) -> None:
    # Given any mix of enqueues (0) and fetches of up to k messages (k)
    queue_key, tokens_key = f"{broker.namespace}:{QUEUE}", broker.wakeups_key(QUEUE)
    broker.flush(QUEUE)
    for step in steps:
        if step == 0:
            broker.enqueue(_message())
        else:
            broker.fetch(QUEUE, step)
        # Then after each there is exactly one token per queued message: none lost, none piling up
        assert broker.client.llen(tokens_key) == broker.client.llen(queue_key)
    broker.client.delete(broker.acks_key(QUEUE))


def test_flushing_a_queue_drops_its_tokens(broker):
    broker.enqueue(_message())
    broker.enqueue(_message(), delay=60_000)
    broker.flush(QUEUE)
    assert not broker.client.exists(broker.wakeups_key(QUEUE), broker.wakeups_key(f"{QUEUE}.DQ"))


def test_consumers_of_several_workers_take_every_message_of_a_bursty_stream_exactly_once(broker):
    # Given three workers' consumers (prefetch 1, 2, 3) whose waits would each last two minutes: a lost
    # wake-up would leave a message queued while all of them wait, and the stream would stall
    received: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def consume(prefetch: int) -> None:
        consumer = _another_worker(broker).consume(QUEUE, prefetch=prefetch, timeout=LONG_WAIT_MS)
        while not stop.is_set():
            message = next(consumer)
            if message is not None:
                with lock:
                    received.append(message.message_id)
                consumer.ack(message)

    for prefetch in (1, 2, 3):
        threading.Thread(target=consume, args=(prefetch,), daemon=True).start()

    # When 300 messages arrive in bursts of 1 to 20, with pauses in which the consumers go idle
    rng = random.Random(7)
    sent: list[str] = []
    try:
        while len(sent) < 300:
            for _ in range(min(rng.randint(1, 20), 300 - len(sent))):
                sent.append(broker.enqueue(_message()).message_id)
            time.sleep(rng.uniform(0, 0.005))  # shapes the load; nothing waits on it

        # Then every message is handed out, and only once
        wait_for(lambda: len(received) >= len(sent), timeout_s=60)
        assert sorted(received) == sorted(sent)
    finally:
        stop.set()
        broker.wake(QUEUE, 3)  # let the waiting consumers see the stop
