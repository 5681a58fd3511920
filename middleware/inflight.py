"""Which copies of each operation's messages exist right now: queued, delayed, running or retrying.

The janitor must tell an operation whose messages are lost (a crash between commit and send, a flushed
broker) from one that merely waits in a backlog or a delay. Asking the broker means scanning every
queue, and differs per broker; instead each copy of an operation's message is added to a Redis set when
it is enqueued. A copy the janitor can look for in the broker (one on the Redis broker, named with the id
its body is stored under) keeps its name after its acknowledgement: the janitor finds it gone, and the
operation's whole set is dropped when the operation ends (``forget_marks``), so an acknowledgement costs no
round trip of its own. Other copies (RabbitMQ's) are removed when they are acknowledged or rejected.

A copy is named by message id and queue, and on the Redis broker by the id its body is stored under
(``redis_message_id``), so the janitor can ask whether it is really there (see ``Copy``). Dramatiq enqueues
the successor copy before it acknowledges the one it replaces (a delayed message moving from ``<queue>.DQ``
to its queue, a retry of a failed attempt, a step's followers), so the set is never empty while the
operation has a message anywhere. A copy held by a worker that died stays in the set: the broker delivers
it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq import Message
from dramatiq.middleware import Middleware

from resources.config import get_settings

from .plan import OPTION_OPERATION
from .redis_state import LazyRedis

__all__ = ["Copy", "InFlight", "find_inflight"]

#: Longer than the longest delay Dramatiq allows (7 days): a set outlives every copy it names.
SET_TTL_S = 8 * 24 * 3600


#: Dramatiq's Redis broker stores each enqueued copy's body under an id of its own, in this option.
REDIS_ID_OPTION = "redis_message_id"


@dataclass(frozen=True)
class Copy:
    """One copy of an operation's message, as its in-flight set names it: ``message_id@queue[#broker_id]``."""

    message_id: str
    queue_name: str
    #: The id the Redis broker stores the copy's body under; None on other brokers (RabbitMQ).
    broker_id: str | None = None

    @classmethod
    def of(cls, message: Message[Any]) -> Copy:
        return cls(message.message_id, message.queue_name, message.options.get(REDIS_ID_OPTION) or None)

    @classmethod
    def parse(cls, name: str) -> Copy:
        rest, _, broker_id = name.partition("#")
        message_id, _, queue_name = rest.partition("@")
        return cls(message_id, queue_name, broker_id or None)

    @property
    def name(self) -> str:
        base = f"{self.message_id}@{self.queue_name}"
        return f"{base}#{self.broker_id}" if self.broker_id else base


def _copy_name(message: Message[Any]) -> str:
    return Copy.of(message).name


class InFlight(LazyRedis, Middleware):
    def __init__(self, client: redis.Redis | None = None, prefix: str | None = None) -> None:
        self._client = client
        self._prefix = prefix

    def _key(self, operation_id: str) -> str:
        prefix = self._prefix or f"{get_settings().namespace}:inflight"
        return f"{prefix}:{operation_id}"

    # Before, not after, the enqueue: a worker may take, run and acknowledge a copy before the broker's
    # after-hooks run, and a name added after its removal would stay for good. The price: an enqueue
    # that then fails (broker unreachable; the sender gets the error) leaves a name until SET_TTL_S. The
    # project's Redis broker instead adds it in the script that stores the message: both or neither, and
    # one round trip for the two.
    def before_enqueue(self, broker: dramatiq.Broker, message: Message[Any], delay: int | None) -> None:
        operation_id = message.options.get(OPTION_OPERATION)
        if operation_id:
            key = self._key(operation_id)
            # A broker on this Redis server adds the name in the round trip of the enqueue, first.
            add_on_enqueue = getattr(broker, "add_on_enqueue", None)
            if add_on_enqueue is not None and add_on_enqueue(message, self.client, key, _copy_name(message), SET_TTL_S):
                return
            with self.client.pipeline(transaction=False) as pipe:
                pipe.sadd(key, _copy_name(message))
                pipe.expire(key, SET_TTL_S)
                pipe.execute()

    def _forget(self, message: Message[Any]) -> None:
        operation_id = message.options.get(OPTION_OPERATION)
        if operation_id:
            self.client.srem(self._key(operation_id), _copy_name(message))

    def after_ack(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        # A name the janitor can check against the broker stays until its operation's set is dropped: one round
        # trip less for every message a worker completes. A name it must take as it is goes now.
        if not Copy.of(message).broker_id:
            self._forget(message)

    def after_nack(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        self._forget(message)

    def copies(self, operation_id: str) -> set[str]:
        """The operation's messages that exist now, by name (``Copy.parse`` reads one). A name is added
        before its send, so it may stand for a copy the broker never got (the sender killed in between)."""
        return set(self.client.smembers(self._key(operation_id)))

    # The names above are added before the send, so a name may stand for a copy that never reached the
    # broker (the sender killed in between). What must never be lost uses these marks instead, made once
    # the broker has taken the messages.
    def mark_sent(self, operation_id: str, message_ids: list[str]) -> None:
        """The broker has taken these messages of the operation (a completed step's successors)."""
        if not message_ids:
            return
        key = self.sent_key(operation_id)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(key, *message_ids)
            pipe.expire(key, SET_TTL_S)
            pipe.execute()

    def names_key(self, operation_id: str) -> str:
        """The set of the operation's copies' names. It holds a copy's name while a worker runs the copy, and the
        operation's end drops it (``forget_marks``): a step under way finds it gone once its operation has ended."""
        return self._key(operation_id)

    def sent_key(self, operation_id: str) -> str:
        """Where ``mark_sent`` records the operation's sent messages."""
        return f"{self._key(operation_id)}:sent"

    def keys_of(self, operation_id: str) -> list[str]:
        """The operation's keys: its copies' names and its sent marks (to drop once it has ended)."""
        return [self._key(operation_id), self.sent_key(operation_id)]

    def forget(self, operation_id: str) -> None:
        """The operation has ended: its names and marks are of no more use (they would stay until ``SET_TTL_S``)."""
        self.client.delete(*self.keys_of(operation_id))

    def sent(self, operation_id: str) -> set[str]:
        """Ids of the operation's messages that ``mark_sent`` recorded."""
        return set(self.client.smembers(self.sent_key(operation_id)))


def find_inflight(broker: dramatiq.Broker) -> InFlight | None:
    return next((m for m in broker.middleware if isinstance(m, InFlight)), None)
