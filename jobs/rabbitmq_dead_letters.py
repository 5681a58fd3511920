"""Dead-lettered messages of the RabbitMQ broker: list them with their error, and requeue them.

Dramatiq's RabbitMQ broker declares every queue with ``<queue>.XQ`` as its dead-letter queue: a message
rejected for good moves there, with RabbitMQ's ``x-death`` header saying when, and stays for the broker's
dead-message TTL (7 days by default). The error shown comes from the same places as on Redis (see
``jobs.dead_letters``).

RabbitMQ cannot read a queue without taking its messages, so both commands take them on a channel of their
own without acknowledging them: closing that channel gives back, in their order, every message not
acknowledged. Requeueing publishes a message to its queue through the broker (its enqueue hooks run, with
publisher confirms), then acknowledges its dead-lettered copy. A crash between the two leaves it in both
places; the one on its queue runs, and the copy can be requeued or left to expire. At most
``JOBS_DEAD_LETTERS_SCAN`` messages of a queue are looked at.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import xq_name

from middleware import DuplicateJob

from .dead_letters import (
    Body,
    DeadLetter,
    DeadLetterListing,
    OperationFacts,
    QueueSelection,
    Requeued,
    UnknownDeadLetters,
    describe,
    fresh_message,
    operation_id_of,
    operations_of,
    what_next,
)

__all__ = ["RabbitmqDeadLetters"]

#: The most dead letters of one queue read per command: each is held in memory until the channel closes.
SCAN_LIMIT = int(os.environ.get("JOBS_DEAD_LETTERS_SCAN", "10000"))


@dataclass(frozen=True)
class _Taken:
    """A dead letter taken from its queue, not acknowledged yet."""

    id: str
    queue: str
    tag: int
    dead_lettered_at: datetime
    body: Body


def _dead_lettered_at(properties: Any) -> datetime:
    deaths = (getattr(properties, "headers", None) or {}).get("x-death") or []
    when = deaths[0].get("time") if deaths and isinstance(deaths[0], dict) else None
    if isinstance(when, datetime):
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if isinstance(when, int | float):
        return datetime.fromtimestamp(when, UTC)
    return datetime.now(UTC)  # no header: not dead-lettered by RabbitMQ itself; shown as new


def _id_of(body: Body) -> str:
    """Dramatiq's message id; for a body that does not decode, a digest of it (stable across listings)."""
    message_id = body.get("message_id")
    return message_id or f"unreadable-{hashlib.sha1(body.raw).hexdigest()[:16]}"


class RabbitmqDeadLetters(QueueSelection):
    """The dead letters of a RabbitMQ broker's declared queues (or of ``queues``)."""

    broker: RabbitmqBroker

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        connection = pika.BlockingConnection(self.broker.parameters)
        try:
            yield connection.channel()
        finally:
            connection.close()  # gives back every message taken and not acknowledged

    def _take(self, channel: Any, queue: str) -> list[_Taken]:
        taken = []
        for _ in range(SCAN_LIMIT):
            method, properties, raw = channel.basic_get(queue=xq_name(queue), auto_ack=False)
            if method is None:
                break
            body = Body.parse(raw, queue, redis=False)
            taken.append(_Taken(_id_of(body), queue, method.delivery_tag, _dead_lettered_at(properties), body))
        return taken

    # -- looking -------------------------------------------------------------------------------------
    def counts(self, queue: str | None = None) -> dict[str, int]:
        with self._channel() as channel:
            return {
                name: channel.queue_declare(queue=xq_name(name), passive=True).method.message_count
                for name in self._queues(queue)
            }

    def listing(self, queue: str | None = None, *, limit: int = 50) -> DeadLetterListing:
        """The ``limit`` most recently dead-lettered messages (of ``queue``, else of every queue)."""
        names = self._queues(queue)
        counts = self.counts(queue)
        with self._channel() as channel:
            taken = [item for name in names for item in self._take(channel, name)]
        newest = sorted(taken, key=lambda item: item.dead_lettered_at, reverse=True)[: max(limit, 0)]
        operations = operations_of(operation_id_of(item.body) for item in newest)
        items: list[DeadLetter] = [
            describe(item.id, item.queue, item.dead_lettered_at, item.body, operations) for item in newest
        ]
        return DeadLetterListing(counts, items)

    # -- requeueing ----------------------------------------------------------------------------------
    def requeue(self, ids: Sequence[str], queue: str | None = None) -> list[Requeued]:
        """Requeue these dead letters; raises UnknownDeadLetters (requeueing none) if any id is unknown."""
        return self._requeue(list(dict.fromkeys(ids)), queue)

    def requeue_all(self, queue: str | None = None) -> list[Requeued]:
        """Requeue every dead letter (of ``queue``, else of every queue), oldest first."""
        return self._requeue(None, queue)

    def _requeue(self, ids: list[str] | None, queue: str | None) -> list[Requeued]:
        names = self._queues(queue)
        with self._channel() as channel:
            taken = [item for name in names for item in self._take(channel, name)]
            if ids is not None:
                found = {item.id for item in taken}
                missing = [i for i in ids if i not in found]
                if missing:
                    raise UnknownDeadLetters(missing, names)  # the channel closes: nothing moved
                wanted, seen = [], set()
                for item in taken:  # the oldest copy of each id (a message may be dead-lettered twice)
                    if item.id in ids and item.id not in seen:
                        seen.add(item.id)
                        wanted.append(item)
            else:
                wanted = taken
            operations = operations_of(operation_id_of(item.body) for item in wanted)
            return [self._requeue_one(channel, item, operations) for item in wanted]

    def _requeue_one(self, channel: Any, item: _Taken, operations: dict[str, OperationFacts]) -> Requeued:
        operation_id = operation_id_of(item.body)
        if item.body.fields is None or item.body.unreadable is not None:
            return Requeued(
                item.id,
                item.queue,
                "unreadable",
                f"left dead-lettered: {item.body.unreadable}; a worker would dead-letter it again",
                operation_id,
            )
        # To its queue itself, not to the delay queue a delayed copy names: its eta is forgotten.
        message = fresh_message(item.body).copy(queue_name=item.queue)
        try:
            self.broker.enqueue(message)  # with publisher confirms: on its queue once this returns
        except DuplicateJob as duplicate:  # raised before any other hook took something for it
            return Requeued(item.id, item.queue, "duplicate", f"left dead-lettered: {duplicate}", operation_id)
        channel.basic_ack(delivery_tag=item.tag)
        return Requeued(item.id, item.queue, "requeued", what_next(item.body, operations), operation_id)
