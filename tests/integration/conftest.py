"""Integration tests run on the Redis broker, or on RabbitMQ when BROKER_URL is an amqp:// URL.

RabbitMQ queue names are not namespaced as the Redis keys are, so each test starts from empty queues:
a message a previous test left behind must not reach this test's workers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from jobs import queues
from tests.conftest import GIVEN_SERVERS

# Only for the CI budget: a stopping worker process waits out its threads' current waits, each up to
# dramatiq_worker_timeout (Dramatiq's default, 1 s), and these tests stop many. Idle consumers still block
# until woken whatever the timeout (tests/unit/test_redis_wakeups.py waits minutes).
os.environ.setdefault("dramatiq_worker_timeout", "100")


def queued_messages(broker: dramatiq.Broker, queue_name: str) -> int:
    """Messages ready in a queue, on either broker."""
    if isinstance(broker, RabbitmqBroker):
        return broker.get_queue_message_counts(queue_name)[0]
    return int(broker.client.llen(f"{broker.namespace}:{queue_name}"))


def on_rabbitmq() -> bool:
    return bool(os.environ.get("BROKER_URL"))


#: For tests of the Redis broker itself (its maintenance, its ack sets, its dead-letter layout).
redis_broker_only = pytest.mark.skipif(on_rabbitmq(), reason="tests the Redis broker; BROKER_URL selects RabbitMQ")

#: For tests that run commands as a new user does, with REDIS_URL and DATABASE_URL removed from their
#: environment whatever this run's are: with either set, they would repeat what the run without them does.
new_user_only = pytest.mark.skipif(
    GIVEN_SERVERS,
    reason="runs as a new user (no REDIS_URL, no DATABASE_URL); the run with neither set covers it",
)


@pytest.fixture(autouse=True)
def empty_rabbitmq_queues() -> Iterator[None]:
    if not on_rabbitmq():
        yield
        return
    broker = RabbitmqBroker(url=os.environ["BROKER_URL"], middleware=[])
    for name in queues.ALL:
        broker.declare_queue(name)
    broker.flush_all()  # a queue that does not exist yet has nothing to purge
    broker.close()
    yield
