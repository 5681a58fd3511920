"""Dramatiq's RedisBroker, hardened against malformed messages and with bounded recovery of dead workers.

Three gaps of the stock broker are closed here:

- **Malformed bodies.** Dramatiq's consumer decodes each fetched body in ``__next__``; a body that is not
  a message (random bytes, JSON of another shape) raises out of the consumer, whose thread then logs an
  "unexpected error" and starts a new consumer. The old consumer's prefetched messages and the bad one
  stay in this worker's acknowledgement set until the worker dies, and then maintenance hands the bad
  one to the next worker. :class:`JobsRedisConsumer` checks every fetched body first: one that does not
  decode, or decodes to something not shaped like a message of this queue, is moved to the queue's
  dead-letter set (``<queue>.XQ``, kept for Dramatiq's dead-message TTL), logged, and skipped; the
  consumer goes on with the next one. When the body still names its operation, ``on_malformed`` is
  called so that the operation fails instead of waiting for a step that will never run.
- **Recovery that depends on luck.** A killed worker's unacknowledged messages go back to their queue
  only during "maintenance", which Dramatiq runs on a random ``maintenance_chance`` per million Redis
  calls, for the queue of that call. :meth:`JobsRedisBroker.run_maintenance` runs it now, and the
  :class:`BrokerMaintenance` middleware does so in every worker every few seconds: a killed worker's
  messages are back within heartbeat timeout + interval.
- **Polling.** Dramatiq's idle consumer polls its queue with a growing sleep of up to the worker timeout:
  a short timeout (quick hand-offs) costs CPU and a Redis call per queue per poll even when idle, a long
  one delays work. Here every enqueue also pushes a wake-up token, and an idle consumer blocks on the
  token list (BLPOP) until one comes; a consumer with no room waits for a worker thread to finish a
  message. An idle consumer asks Redis once per worker timeout instead of every few ms, and new work
  starts at once.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import MAINTENANCE_COMMAND_BLACKLIST, RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.middleware import Middleware
from redis.commands.core import Script

from middleware.heartbeat import Heartbeat
from middleware.message_proxy import FieldsProxy
from middleware.plan import OPTION_OPERATION
from middleware.transitions import end_operation
from resources.config import get_settings
from resources.redis_client import RoundTripScript, run_script

from .hook_dispatch import HandlersOnly

__all__ = [
    "BrokerMaintenance",
    "DeferredEnqueue",
    "JobsRedisBroker",
    "JobsRedisConsumer",
    "MalformedCallback",
    "fail_malformed_operation",
    "malformed_reason",
    "preview",
]

logger = logging.getLogger(__name__)

#: ``on_malformed(queue_name, redis_message_id, operation_id, reason)``.
MalformedCallback = Callable[[str, str, str, str], None]

#: How much of a bad body the log shows, in characters.
PREVIEW_CHARS = 200
#: Longest reason (decode error, shape problem) put in a log line or an operation's error.
REASON_CHARS = 300
#: Waits shorter than this, in seconds, sleep instead of blocking in Redis: Redis ends a blocked command
#: whose timeout passed on its next event-loop turn, up to 1/hz s later (100 ms with the default hz of 10).
SHORTEST_BLOCK_S = 0.1
#: The fields ``Message.asdict()`` writes; ``message_id`` and ``message_timestamp`` have defaults.
_REQUIRED_FIELDS = frozenset({"queue_name", "actor_name", "args", "kwargs", "options"})
_FIELDS = _REQUIRED_FIELDS | {"message_id", "message_timestamp"}
# Every enqueue of this broker (dispatch.lua's stores the same id and body, but wakes no one): store the
# body, queue its id, and push a wake-up token for a consumer idling on the queue (see wait_for_enqueue).
# With a set key, it first adds a member to that set (an operation's in-flight names, see middleware.inflight),
# in the same round trip. With a guard key (a deferred enqueue, see ``defer_enqueues``), it does nothing
# unless that key exists. Answers 1 when it enqueued, 0 when the guard stopped it.
# KEYS: queue, bodies, wake-ups[, set]. ARGV: message id, body[, member, the set's expiry (s)[, guard key]].
_ENQUEUE = """
if ARGV[5] and redis.call('exists', ARGV[5]) == 0 then return 0 end
if KEYS[4] then
  redis.call('sadd', KEYS[4], ARGV[3])
  redis.call('expire', KEYS[4], ARGV[4])
end
redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
redis.call('rpush', KEYS[1], ARGV[1])
redis.call('rpush', KEYS[3], '1')
return 1
"""

# The consumer's fetch (see dispatch.lua for the keys): refresh this worker's heartbeat, move up to ARGV[3] ids
# from the queue into this worker's ack set, answer id, body, id, body, … (a gone body answers nil). Then keep
# no more wake-up tokens than messages left: every token left stands for a message still queued, so a
# consumer woken by one finds work (or the queue empty, and the tokens gone), and the list stays bounded.
# KEYS: heartbeats, queue, bodies, this worker's ack set of the queue, wake-ups. ARGV: now (ms), worker id, count.
_FETCH = """
redis.call('zadd', KEYS[1], ARGV[1], ARGV[2])
local reply = {}
for i = 1, tonumber(ARGV[3]) do
  local id = redis.call('lpop', KEYS[2])
  if not id then break end
  redis.call('sadd', KEYS[4], id)
  reply[2 * i - 1] = id
  reply[2 * i] = redis.call('hget', KEYS[3], id)
end
local left = redis.call('llen', KEYS[2])
if left == 0 then
  redis.call('del', KEYS[5])
elseif redis.call('llen', KEYS[5]) > left then
  redis.call('ltrim', KEYS[5], 0, left - 1)
end
return reply
"""

# After maintenance, which puts dead workers' messages back without an enqueue: push tokens until there are
# as many as messages queued (at most ARGV[1] at once: more would only wake consumers that find nothing).
# KEYS: queue, wake-ups. ARGV: most tokens to push. Answers how many it pushed.
_TOP_UP = """
local missing = math.min(redis.call('llen', KEYS[1]) - redis.call('llen', KEYS[2]), tonumber(ARGV[1]))
if missing <= 0 then return 0 end
local tokens = {}
for i = 1, missing do tokens[i] = '1' end
redis.call('rpush', KEYS[2], unpack(tokens))
return missing
"""
#: The most wake-up tokens one top-up pushes (far more than the consumers that could be waiting).
TOP_UP_MAX = 1000


def preview(data: bytes | str | None, limit: int = PREVIEW_CHARS) -> str:
    """A printable, clipped rendering of a message body for a log line."""
    if data is None:
        return "<no body>"
    text = data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else data
    pieces: list[str] = []
    length = 0
    for char in text[: limit + 1]:  # every char renders as at least one
        piece = char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        if length + len(piece) > limit:
            pieces.append(f"… ({len(data)} {'bytes' if isinstance(data, bytes) else 'chars'})")
            break
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces)


def _clip(text: str, limit: int = REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe_decode_error(error: Exception) -> str:
    # Dramatiq's JSON encoder puts the whole body in its message; the cause says what is wrong.
    cause = error.error if isinstance(error, DecodeError) and isinstance(error.error, Exception) else error
    return _clip(f"it does not decode: {type(cause).__name__}: {cause}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def malformed_reason(fields: Any, queue_name: str, *, redis: bool = True) -> str | None:
    """Why decoded ``fields`` are not a message a worker consuming ``queue_name`` can handle; None if they are.

    Checks what Dramatiq's worker relies on without checking: a worker thread finds its consumer by the
    message's queue name (an unknown one kills the thread), acknowledges it by
    ``options["redis_message_id"]`` (on Redis: ``redis=False`` skips that) and looks its actor up by name.
    """
    if not isinstance(fields, dict):
        return f"it is a JSON {type(fields).__name__}, not a message object"
    missing = sorted(_REQUIRED_FIELDS - fields.keys())
    if missing:
        return f"it has no {', '.join(missing)}"
    unknown = sorted(str(k) for k in fields.keys() - _FIELDS)
    if unknown:
        return _clip(f"it has unknown fields {', '.join(unknown)}")
    # On RabbitMQ a delayed copy names its delay queue wherever it is dead-lettered.
    named = fields["queue_name"] if redis or not isinstance(fields["queue_name"], str) else q_name(fields["queue_name"])
    if named != queue_name:
        return _clip(f"its queue_name {fields['queue_name']!r} is not the queue it is on")
    if not isinstance(fields["actor_name"], str) or not fields["actor_name"]:
        return _clip(f"its actor_name {fields['actor_name']!r} is not a name")
    if not isinstance(fields["args"], list | tuple):
        return f"its args are a {type(fields['args']).__name__}, not a list"
    if not isinstance(fields["kwargs"], dict) or not all(isinstance(k, str) for k in fields["kwargs"]):
        return f"its kwargs are a {type(fields['kwargs']).__name__}, not an object"
    options = fields["options"]
    if not isinstance(options, dict):
        return f"its options are a {type(options).__name__}, not an object"
    redis_message_id = options.get("redis_message_id")
    if redis and (not isinstance(redis_message_id, str) or not redis_message_id):
        return _clip(f"its options have no redis_message_id (got {redis_message_id!r})")
    if "eta" in options and options["eta"] is not None and not _is_number(options["eta"]):
        return _clip(f"its eta {options['eta']!r} is not a time")
    if "message_id" in fields and (not isinstance(fields["message_id"], str) or not fields["message_id"]):
        return _clip(f"its message_id {fields['message_id']!r} is not an id")
    if "message_timestamp" in fields and not _is_number(fields["message_timestamp"]):
        return _clip(f"its message_timestamp {fields['message_timestamp']!r} is not a time")
    return None


def _operation_of(fields: Any) -> str | None:
    options = fields.get("options") if isinstance(fields, dict) else None
    operation_id = options.get(OPTION_OPERATION) if isinstance(options, dict) else None
    return operation_id if isinstance(operation_id, str) and operation_id else None


def fail_malformed_operation(
    broker: dramatiq.Broker, queue_name: str, message_id: str, operation_id: str, reason: str
) -> None:
    """The default ``on_malformed``: fail the operation whose message was dead-lettered, free its throttle
    slot and send its failure callbacks. Never raises: it runs in a consumer thread."""
    error = f"message {message_id} on queue {queue_name} could not be read ({reason}); it was dead-lettered"
    try:
        end_operation(broker, operation_id, "unreadable message", error)
    except Exception:
        logger.exception(
            "could not fail operation %s after dead-lettering its message %s on queue %s",
            operation_id,
            message_id,
            queue_name,
        )


@dataclass
class _Fetched:
    """One fetched body, with the id it was fetched under, on its way through the checks."""

    redis_message_id: bytes
    data: bytes | None
    message: Message[Any] | None = None
    reason: str = ""
    operation_id: str | None = None


class JobsRedisConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, checking every body before a worker sees it.

    ``__next__`` is replaced (Dramatiq's decodes inside it and lets the error escape). Fetched bodies go
    through ``_unchecked`` (fetched, not yet checked) and ``_rejects`` (bad, not yet dead-lettered) before
    the good ones reach ``message_cache``, which here holds decoded messages. A Redis error in between
    keeps them for the next call instead of dropping them with the consumer.
    """

    broker: JobsRedisBroker

    def __init__(
        self, broker: JobsRedisBroker, queue_name: str, prefetch: int, timeout: int, *, recover_orphans: bool = False
    ) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._recover_orphans_first = recover_orphans
        self.message_cache: list[Message[Any]] = []
        #: Fetched (id, body) pairs not yet checked.
        self._unchecked: list[tuple[bytes, bytes | None]] = []
        self._rejects: list[_Fetched] = []
        self._settle_failures = 0
        #: Set when a handed-out message is finished: a consumer with no room left waits for it.
        self._room = threading.Event()
        #: Delayed messages handed out and not yet finished: message id → when due (ms).
        self._due: dict[str, float] = {}
        #: The last fetch found the queue empty (it took fewer ids than it asked for): until a wake-up token says
        #: that a message came, fetching again would find nothing.
        self._drained = False

    # Dramatiq's counts handed-out and cached messages; fetched ones still being checked count too, or the
    # consumer would fetch past its prefetch limit.
    @property
    def outstanding_message_count(self) -> int:
        return len(self.queued_message_ids) + len(self.message_cache) + len(self._unchecked) + len(self._rejects)

    @property
    def acks_key(self) -> str:
        """This worker's set of fetched, unacknowledged message ids of this queue (see dispatch.lua)."""
        return self.broker.acks_key(self.queue_name)

    @property
    def bodies_key(self) -> str:
        return self.broker.bodies_key(self.queue_name)

    def __next__(self) -> MessageProxy | None:
        """The next checked message; None after waiting in vain, so that the worker's consumer thread can look
        at its stop flag and its delayed messages.

        Nothing here polls. With room for more messages and none queued, it waits for an enqueue's wake-up
        token (see ``JobsRedisBroker.wait_for_enqueue``); with no room, for a worker thread to finish one.
        Either wait ends at the worker's timeout (``dramatiq_worker_timeout``), or sooner when a delayed
        message this consumer holds is due.
        """
        try:
            if self._recover_orphans_first:
                self._recover_orphans()
                self._recover_orphans_first = False
            woken = False
            while True:
                if self._unchecked or self._rejects:
                    try:
                        self._settle()
                        self._settle_failures = 0
                    except (redis.ConnectionError, redis.TimeoutError) as error:
                        # Keep them: a new consumer would not know them, and they would sit in this
                        # worker's ack set until it dies.
                        if self._settle_failures == 0:
                            self.logger.warning("Redis unreachable while checking fetched messages: %s", error)
                        self._settle_failures, backoff_ms = compute_backoff(
                            self._settle_failures, factor=100, max_backoff=5000
                        )
                        time.sleep(backoff_ms / 1000)
                        return None
                if self.message_cache:
                    return self._hand_out(self.message_cache.pop(0))
                self._room.clear()  # before counting: a message finished from now on sets it again
                room = self.prefetch - self.outstanding_message_count
                if room <= 0:
                    self._room.wait(self._wait_s())
                    return None
                if self._drained and not woken:
                    # Every message enqueued since that fetch has pushed a token (see _FETCH and _ENQUEUE): wait for
                    # one rather than fetch first, a round trip per message saved when the workers keep up.
                    woken = self._wait_for_enqueue()
                    if not woken:
                        return None
                fetched = self.broker.fetch(self.queue_name, room)
                self._drained = len(fetched) < room
                if fetched:
                    self._unchecked = fetched
                    continue
                if woken:
                    return None  # a stale token: another consumer took that message
                woken = self._wait_for_enqueue()
                if not woken:
                    return None
        except redis.ConnectionError as error:
            raise ConnectionClosed(error) from None

    def _wait_for_enqueue(self) -> bool:
        woken = self.broker.wait_for_enqueue(self.queue_name, self._wait_s())
        if not woken:
            # A wait in vain ends with a fetch: a message that came back without a token (a server that lost its
            # tokens, say) is found within a worker timeout, as before tokens were trusted.
            self._drained = False
        return woken

    def _hand_out(self, message: Message[Any]) -> MessageProxy:
        self.queued_message_ids.add(message.message_id)
        eta = message.options.get("eta")
        if _is_number(eta):
            # A delayed message: the worker's consumer thread moves it to its queue when due, after a
            # __next__ returns; the waits here end by then.
            self._due[message.message_id] = eta
        self.broker.handed_out(self.queue_name, message.options["redis_message_id"])
        return FieldsProxy(message)

    def _wait_s(self) -> float:
        """How long a wait may last: the worker's timeout, or until the earliest delayed message is due."""
        wait_ms = float(self.timeout)
        due = list(self._due.values())  # a snapshot: acks may change the dict from other threads
        if due:
            wait_ms = min(wait_ms, min(due) - current_millis())
        return wait_ms / 1000

    def _finished(self, message: MessageProxy) -> None:
        self._due.pop(message.message_id, None)
        self.broker.handed_back(self.queue_name, message.options["redis_message_id"])
        self._room.set()

    # Called from worker threads (and, for delayed messages, the consumer thread).
    def ack(self, message: MessageProxy) -> None:
        super().ack(message)
        self._finished(message)

    def nack(self, message: MessageProxy) -> None:
        super().nack(message)
        self._finished(message)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Dramatiq's, but a Redis error surfaces as the broker's connection error. Dramatiq's worker calls
        this while closing a consumer after an error, and only survives a ConnectionClosed: a plain redis
        error there (Redis still down) ends the consumer thread for good, stranding every message of its
        queue in this worker's ack set while the worker goes on heartbeating. The ids it could not put back
        are still in that set, and the next consumer's orphan recovery puts them back."""
        requeued = list(messages)
        try:
            super().requeue(requeued)
            self.broker.wake(self.queue_name, len(requeued))
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise ConnectionClosed(error) from None
        for message in requeued:
            self._finished(message)

    def _recover_orphans(self) -> None:
        """Put back the messages a previous consumer of this queue lost in a connection error.

        Dramatiq then drops the consumer's prefetched messages and, for a delay queue, every delayed message
        the worker held in memory; their ids stay in this worker's ack set, which nothing reads again while
        the worker lives (maintenance only requeues dead workers' sets). Every id of that set that no
        worker thread holds is an orphan; on a delay queue, all of them are.
        """
        held = set() if self.queue_name != q_name(self.queue_name) else self.broker.held(self.queue_name)
        orphans = [i for i in (m.decode() for m in self.broker.client.smembers(self.acks_key)) if i not in held]
        if orphans:
            self.broker.do_requeue(self.queue_name, *orphans)
            self.broker.wake(self.queue_name, len(orphans))
            self.logger.warning(
                "put back %d message(s) of queue %r that a lost connection had left unprocessed",
                len(orphans),
                self.queue_name,
            )

    def close(self) -> None:
        # Dramatiq forgets a closed consumer's prefetched messages: they would stay in this worker's ack
        # set until it dies. Put them back now (the script only requeues ids still in that set).
        pending = [message.options["redis_message_id"] for message in self.message_cache]
        self.message_cache = []
        if pending:
            try:
                self.broker.do_requeue(self.queue_name, *pending)
                self.broker.wake(self.queue_name, len(pending))
            except redis.RedisError as error:
                self.logger.warning("could not requeue %d prefetched messages: %s", len(pending), error)
        super().close()

    # -- the checks ----------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Check the fetched batch (no Redis call), then dead-letter its bad bodies one by one."""
        if self._unchecked:
            entries = [self._inspect(redis_message_id, data) for redis_message_id, data in self._unchecked]
            self.message_cache.extend(e.message for e in entries if e.message is not None)
            self._rejects.extend(e for e in entries if e.message is None)
            self._unchecked = []
        while self._rejects:
            self._reject(self._rejects[0])
            self._rejects.pop(0)

    def _inspect(self, redis_message_id: bytes, data: bytes | None) -> _Fetched:
        if data is None:
            # Dramatiq's issue #266: an id whose body is gone. Its id only clutters the ack set.
            return _Fetched(redis_message_id, None, reason="its body is missing from the queue")
        try:
            fields = dramatiq.get_encoder().decode(data)
        except Exception as error:
            return _Fetched(redis_message_id, data, reason=_describe_decode_error(error))
        entry = _Fetched(redis_message_id, data, operation_id=_operation_of(fields))
        reason = malformed_reason(fields, self.queue_name)
        named = fields["options"]["redis_message_id"] if reason is None else None
        if named is not None and named != redis_message_id.decode("utf-8", "replace"):
            # Acknowledging it would remove the id it names, not the one it holds in the ack set.
            reason = _clip(f"its redis_message_id {named!r} is not the id it is stored under")
        if reason is not None:
            entry.reason = reason
            return entry
        try:
            entry.message = Message(**fields)
        except Exception as error:
            entry.reason = _clip(f"it is not a message: {type(error).__name__}: {error}")
        return entry

    def _reject(self, entry: _Fetched) -> None:
        """Dead-letter one bad body (idempotent: a repeated nack finds the id gone), log it, tell its
        operation. Only the nack may raise."""
        self.broker.do_nack(self.queue_name, entry.redis_message_id)
        message_id = entry.redis_message_id.decode("utf-8", "backslashreplace")
        if entry.data is None:
            logger.warning(
                "queue %s: fetched message id %s whose body is gone; removed it from this worker's acknowledgements",
                self.queue_name,
                message_id,
            )
            return
        # Not there: the body left the ack set meanwhile (a purge), so the nack dead-lettered nothing.
        dead_lettered = self.broker.dead_lettered(self.queue_name, entry.redis_message_id)
        logger.error(
            "queue %s: message %s is malformed (%s); %s. Body: %s",
            self.queue_name,
            message_id,
            entry.reason,
            "moved it to the dead-letter queue" if dead_lettered else "it had left this worker's acknowledgements",
            preview(entry.data),
        )
        if dead_lettered and entry.operation_id is not None and self.broker.on_malformed is not None:
            try:
                self.broker.on_malformed(self.queue_name, message_id, entry.operation_id, entry.reason)
            except Exception:
                logger.exception("on_malformed failed for message %s of operation %s", message_id, entry.operation_id)


@dataclass(frozen=True)
class DeferredEnqueue:
    """A message's store in Redis, recorded instead of made (``JobsRedisBroker.defer_enqueues``)."""

    script: Script
    keys: list[str]
    args: list[str | bytes | int]

    def guarded_args(self, guard_key: str) -> list[str | bytes | int]:
        """The arguments of a run that stores the message only if ``guard_key`` exists then."""
        return [*self.args, *[""] * (4 - len(self.args)), guard_key]

    def run(self) -> None:
        """Store the message now, unguarded."""
        self.script(keys=self.keys, args=self.args)


class JobsRedisBroker(HandlersOnly, RedisBroker):
    """A RedisBroker whose consumers survive malformed messages and which can run maintenance on demand.

    ``on_malformed(queue_name, redis_message_id, operation_id, reason)`` is called from a consumer thread
    after a body naming its operation was dead-lettered; by default the operation fails
    (:func:`fail_malformed_operation`). Other arguments are RedisBroker's.
    """

    def __init__(self, *, on_malformed: MalformedCallback | None = None, **parameters: Any) -> None:
        self._local = threading.local()
        #: Per queue, the ids of messages handed to worker threads and not yet acked or nacked.
        self._held: dict[str, set[str]] = {}
        self._held_lock = threading.Lock()
        #: Queues a consumer was made for: a second one follows a lost connection.
        self._consumed: set[str] = set()
        self._fetch_script: Script | None = None
        self._enqueue_script: Script | None = None
        self._top_up_script: Script | None = None
        super().__init__(**parameters)
        # Dramatiq's acks, nacks and maintenance call its dispatch script: on the project's client, without a
        # client command's bookkeeping (see resources.redis_client.run_calls).
        self.scripts = {name: RoundTripScript(self.client, script) for name, script in self.scripts.items()}
        self.on_malformed: MalformedCallback | None = on_malformed or functools.partial(fail_malformed_operation, self)

    @property
    def consumer_class(self) -> type[JobsRedisConsumer]:
        return JobsRedisConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> JobsRedisConsumer:
        again = queue_name in self._consumed
        self._consumed.add(queue_name)
        if again and queue_name != q_name(queue_name):
            # Dramatiq emptied the delay queue of the consumer this one replaces: nothing of it is held.
            with self._held_lock:
                self._held.pop(queue_name, None)
        return JobsRedisConsumer(self, queue_name, prefetch, timeout, recover_orphans=again)

    def handed_out(self, queue_name: str, redis_message_id: str) -> None:
        with self._held_lock:
            self._held.setdefault(queue_name, set()).add(redis_message_id)

    def handed_back(self, queue_name: str, redis_message_id: str) -> None:
        with self._held_lock:
            self._held.get(queue_name, set()).discard(redis_message_id)

    def held(self, queue_name: str) -> set[str]:
        with self._held_lock:
            return set(self._held.get(queue_name, ()))

    def fetch(self, queue_name: str, count: int) -> list[tuple[bytes, bytes | None]]:
        """Move up to ``count`` message ids of the queue into this worker's ack set; each id with its body (None
        for an id whose body is gone). Dramatiq's fetch answers the bodies alone, so telling a body stored
        under another id than the one it names cost a second round trip per fetch."""
        if self._fetch_script is None:
            self._fetch_script = self.client.register_script(_FETCH)
        consumer_keys = [
            f"{self.namespace}:__heartbeats__",
            f"{self.namespace}:{queue_name}",
            self.bodies_key(queue_name),
            self.acks_key(queue_name),
            self.wakeups_key(queue_name),
        ]
        count = min(count, self._max_unpack_size())
        reply = run_script(self.client, self._fetch_script, consumer_keys, [current_millis(), self.broker_id, count])
        return list(zip(reply[0::2], reply[1::2], strict=True))

    def wait_for_enqueue(self, queue_name: str, timeout_s: float) -> bool:
        """Block until a message is enqueued on the queue (True) or ``timeout_s`` passes (False).

        An idle consumer waits here instead of polling: each enqueue pushes a token that wakes one waiter
        (BLPOP hands each token to one client, longest waiting first). A token may be stale (another
        consumer took its message first): the woken consumer's fetch then finds nothing, and drops the rest.
        Messages put back by maintenance get their tokens when it ends (``run_maintenance``).
        """
        # Block less long than the client waits for a reply (redis-py's default: 5 s), or the wait fails.
        if self.read_timeout_s is not None:
            timeout_s = min(timeout_s, self.read_timeout_s - SHORTEST_BLOCK_S)
        if timeout_s <= 0:
            return False
        if timeout_s < SHORTEST_BLOCK_S:
            time.sleep(timeout_s)  # the next fetch finds what came meanwhile
            return False
        try:
            return self.client.blpop([self.wakeups_key(queue_name)], timeout=timeout_s) is not None
        except redis.TimeoutError:
            return False  # Redis answered later than the client waits: a wait cut short

    @functools.cached_property
    def read_timeout_s(self) -> float | None:
        """How long the client waits for a reply: a connection made as its pool makes them (never connected)
        tells, defaults included."""
        pool = self.client.connection_pool
        timeout: float | None = pool.connection_class(**pool.connection_kwargs).socket_timeout
        return timeout

    def top_up_wakeups(self, queue_name: str) -> int:
        """Push wake-up tokens until the queue has one per queued message (at most ``TOP_UP_MAX``), for messages
        that came back without an enqueue; returns how many it pushed."""
        if self._top_up_script is None:
            self._top_up_script = self.client.register_script(_TOP_UP)
        keys = [f"{self.namespace}:{queue_name}", self.wakeups_key(queue_name)]
        return int(self._top_up_script(keys=keys, args=[TOP_UP_MAX]))

    def wake(self, queue_name: str, count: int) -> None:
        """Wake up to ``count`` consumers idling on the queue, for messages put back without an enqueue."""
        if count > 0:
            self.client.rpush(self.wakeups_key(queue_name), *["1"] * count)

    def add_on_enqueue(self, message: Message[Any], client: redis.Redis, key: str, member: str, ttl_s: int) -> bool:
        """From a ``before_enqueue`` hook: add ``member`` to set ``key`` (on ``client``) in the round trip that
        enqueues ``message``, just before the message is stored. False when ``client`` talks to another Redis
        server: the caller adds it itself then."""
        redis_message_id = message.options.get("redis_message_id")
        if not redis_message_id or not self.shares_server(client):
            return False  # not on its way through this broker's enqueue, or another server
        self._local.adding = (redis_message_id, key, member, ttl_s)
        return True

    @contextmanager
    def defer_enqueues(self) -> Iterator[list[DeferredEnqueue]]:
        """Within the block, this thread's enqueues run the middleware's hooks as usual, but each message's store
        in Redis is recorded in the yielded list instead of made: the caller makes them, e.g. in the round trip of
        the throttle's admission and only if it grants (``ThrottleStore.acquire``'s ``then``)."""
        deferred: list[DeferredEnqueue] = []
        self._local.deferred = deferred
        try:
            yield deferred
        finally:
            self._local.deferred = None

    def do_enqueue(self, queue_name: str, redis_message_id: str, data: bytes) -> None:
        if self._enqueue_script is None:
            self._enqueue_script = self.client.register_script(_ENQUEUE)
        keys = [f"{self.namespace}:{queue_name}", self.bodies_key(queue_name), self.wakeups_key(queue_name)]
        args: list[str | bytes | int] = [redis_message_id, data]
        adding = getattr(self._local, "adding", None)
        self._local.adding = None
        # Only for the message it was asked for: a hook after the asking one may have refused that enqueue.
        if adding is not None and adding[0] == redis_message_id:
            _, key, member, ttl_s = adding
            keys.append(key)
            args += [member, ttl_s]
        deferred = getattr(self._local, "deferred", None)
        if deferred is not None:
            deferred.append(DeferredEnqueue(self._enqueue_script, keys, args))
            return
        self._enqueue_script(keys=keys, args=args)

    def flush(self, queue_name: str) -> None:
        super().flush(queue_name)
        self.client.delete(self.wakeups_key(queue_name), self.wakeups_key(dq_name(queue_name)))

    def shares_server(self, client: redis.Redis) -> bool:
        """Whether ``client`` talks to this broker's Redis server and database."""
        ours, theirs = self.client.connection_pool.connection_kwargs, client.connection_pool.connection_kwargs
        return all(ours.get(name) == theirs.get(name) for name in ("host", "port", "path", "db"))

    def dead_lettered(self, queue_name: str, redis_message_id: bytes | str) -> bool:
        return bool(self.client.hexists(f"{self.namespace}:{xq_name(queue_name)}.msgs", redis_message_id))

    def acks_key(self, queue_name: str) -> str:
        """This worker's set of fetched, unacknowledged message ids of the queue (see dispatch.lua)."""
        return f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"

    def wakeups_key(self, queue_name: str) -> str:
        """The queue's list of wake-up tokens: one per enqueue, none beyond the messages still queued."""
        return f"{self.namespace}:{queue_name}.wakeups"

    def bodies_key(self, queue_name: str) -> str:
        """The queue's hash of message id → body (see dispatch.lua): every copy not yet acknowledged."""
        return f"{self.namespace}:{queue_name}.msgs"

    def stores(self, queue_name: str, redis_message_id: str) -> bool:
        """Is this copy anywhere in the broker: queued or delayed on ``queue_name``, or fetched by a worker
        and not yet acknowledged? (Dramatiq keeps each copy's body until its ack or nack.)"""
        return bool(self.client.hexists(self.bodies_key(queue_name), redis_message_id))

    def maintenance_queues(self) -> list[str]:
        """Every declared queue and delay queue: maintenance works one queue at a time."""
        return sorted({*self.get_declared_queues(), *self.get_declared_delay_queues()})

    def run_maintenance(self, queue_names: Iterable[str] | None = None) -> None:
        """Run Dramatiq's maintenance now for each queue (all declared ones by default): put dead workers'
        unacknowledged messages back in their queue and drop expired dead letters. Then each queue gets the
        wake-up tokens of what came back, so idle consumers take it at once.

        dispatch.lua runs maintenance, when asked, for the queue of the call at hand, before the command;
        ``qsize`` only reads, so it is the vehicle.
        """
        names = list(queue_names) if queue_names is not None else self.maintenance_queues()
        self._local.forced = True
        try:
            for name in names:
                self.do_qsize(name)
                self.top_up_wakeups(name)
        finally:
            self._local.forced = False

    # Overrides a Dramatiq internal: it draws the random maintenance chance for every dispatched command.
    # Calls made by run_maintenance (this thread only, flagged) always ask for maintenance.
    def _should_do_maintenance(self, command: str) -> int:
        if getattr(self._local, "forced", False) and command not in MAINTENANCE_COMMAND_BLACKLIST:
            return 1
        return super()._should_do_maintenance(command)


class BrokerMaintenance(Middleware):
    """Runs the broker's maintenance for every declared queue every ``interval_s`` in each worker process.

    A no-op unless the broker is a :class:`JobsRedisBroker`. Each run also refreshes this worker's broker
    heartbeat, so a worker whose threads are all busy with long steps (and so fetch nothing) is not
    mistaken for a dead one.
    """

    def __init__(self, interval_s: float | None = None) -> None:
        self.interval_s = interval_s
        self._thread: Heartbeat | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not isinstance(broker, JobsRedisBroker) or self._thread is not None:
            return
        interval_s = self.interval_s or get_settings().broker_maintenance_interval_s
        self._thread = Heartbeat("broker-maintenance", interval_s, functools.partial(_maintain, broker, interval_s))
        self._thread.start()

    # Stopped after the shutdown, not before: while a stopping worker waits for its running steps, these
    # beats are its heartbeat, and without them its messages could be handed to another worker meanwhile.
    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None


def _maintain(broker: JobsRedisBroker, interval_s: float) -> None:
    try:
        broker.run_maintenance()
    except redis.RedisError as error:
        logger.warning("broker maintenance failed: %s; trying again in %s s", error, interval_s)
