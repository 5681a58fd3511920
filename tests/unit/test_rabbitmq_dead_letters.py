"""Reading RabbitMQ's dead letters: when each was dead-lettered, its id, and which bodies a worker can run."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

from dramatiq import Message

from jobs.dead_letters import Body
from jobs.rabbitmq_dead_letters import _dead_lettered_at, _id_of


def body_of(message: Message) -> bytes:
    return message.encode()


def test_the_time_comes_from_rabbitmqs_x_death_header():
    at = datetime(2026, 11, 21, 12, 0, 0)
    assert _dead_lettered_at(SimpleNamespace(headers={"x-death": [{"time": at}]})) == at.replace(tzinfo=UTC)
    assert _dead_lettered_at(SimpleNamespace(headers={"x-death": [{"time": 1_700_000_000}]})) == datetime.fromtimestamp(
        1_700_000_000, UTC
    )
    # Without the header (not dead-lettered by RabbitMQ itself) it counts as new rather than failing
    assert _dead_lettered_at(SimpleNamespace(headers=None)) <= datetime.now(UTC)


def test_a_readable_dead_letter_is_named_by_its_message_id_and_an_unreadable_one_by_a_stable_digest():
    message = Message(queue_name="default", actor_name="backend_method", args=(), kwargs={}, options={})
    readable = Body.parse(body_of(message), "default", redis=False)
    assert readable.unreadable is None and _id_of(readable) == message.message_id
    garbage = Body.parse(b"\xff not json", "default", redis=False)
    assert garbage.unreadable is not None
    assert _id_of(garbage) == _id_of(Body.parse(b"\xff not json", "default", redis=False))
    assert _id_of(garbage).startswith("unreadable-")


def test_a_rabbitmq_body_needs_no_redis_id_and_a_delayed_copy_belongs_to_its_queue():
    # Given a delayed copy, as RabbitMQ dead-letters it into its canonical queue's XQ
    delayed = Message(queue_name="default.DQ", actor_name="backend_method", args=(), kwargs={}, options={"eta": 1})

    # Then on RabbitMQ it is a message a worker of "default" can run; on Redis it lacks its redis id
    assert Body.parse(body_of(delayed), "default", redis=False).unreadable is None
    assert "redis_message_id" in (Body.parse(body_of(delayed), "default.DQ").unreadable or "")
    # ... and a body naming another queue altogether is still refused
    other = Message(queue_name="heavy", actor_name="backend_method", args=(), kwargs={}, options={})
    assert "not the queue it is on" in (Body.parse(body_of(other), "default", redis=False).unreadable or "")
