"""Dead-lettered messages of the Redis broker: list them with their error, and requeue them.

Dramatiq's Redis broker keeps a message that failed for good in ``<namespace>:<queue>.XQ`` (a sorted set
of ids scored by the time, in ms, it was dead-lettered) with its body in ``<queue>.XQ.msgs``, for the
broker's dead-message TTL (7 days by default); a delay queue's failures go to its canonical queue's set.
The body stored is the one that was enqueued: the error of the attempt that failed for good is not in it
(``options["traceback"]`` holds only the error of an *earlier* attempt, written when Retries queued the
message again). So the error shown is taken, in this order, from:

- ``operation``: the operation of a step that failed for good stores the step's error and traceback;
- ``unreadable``: a body no worker could read says why itself (checked again here);
- ``earlier_attempt``: the traceback a retried message carries (the last attempt may have failed
  otherwise);
- ``none``: nothing was recorded; the worker's log has it.

Requeueing puts the message back on its queue under the same id, in one Lua script that checks the
dead-lettered body is unchanged: its retry count, traceback and eta are cleared, and the broker's
``before_enqueue``/``after_enqueue`` hooks run as for any enqueue (de-duplication, in-flight tracking).
A step of an operation that has already ended (the usual case: the step's failure failed its operation)
is delivered again but *skipped* by the worker: requeueing does not revive an operation. Run the
operation again instead; the requeue output says so for each such message.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import dramatiq
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select

from middleware import DuplicateJob, find_deduplicate, find_inflight
from middleware.plan import OPTION_CALLBACK, OPTION_NODE, OPTION_OPERATION, OPTION_RESOURCE
from resources.db import read_scope
from resources.errors import JobsError
from resources.models import Operation, OperationStatus

from .redis_broker import malformed_reason, preview

__all__ = [
    "DeadLetter",
    "DeadLetterListing",
    "DeadLetters",
    "ErrorSource",
    "Outcome",
    "QueueKeys",
    "Requeued",
    "UnknownDeadLetters",
    "UnknownQueue",
]

ErrorSource = Literal["operation", "unreadable", "earlier_attempt", "none"]
Outcome = Literal["requeued", "duplicate", "unreadable", "gone"]

#: The failed step an operation records for a message no worker could read (see jobs.redis_broker).
_UNREADABLE_STEP = "unreadable message"
#: Options that describe past attempts: a requeued message starts afresh.
_ATTEMPT_OPTIONS = ("retries", "traceback", "requeue_timestamp", "eta")
#: Dead letters read per round trip while requeueing a whole queue.
_CHUNK = 200
NOT_RECORDED = (
    "not recorded: Dramatiq keeps no error with a message that failed on its first attempt; "
    "see the worker's log for this message id"
)

# Move one dead letter back to its queue if its body is still the one read.
# KEYS: dead-letter set, dead-letter bodies, queue list, queue bodies, wake-up tokens. ARGV: id, body read,
# new body. A moved message gets a wake-up token, as an enqueue leaves one.
# Returns 1 moved, 0 gone, 2 gone and on its queue already (another requeue won), 3 body changed.
_MOVE = """
local body = redis.call('HGET', KEYS[2], ARGV[1])
if not body then
  if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then return 2 end
  return 0
end
if body ~= ARGV[2] then return 3 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[5], '1')
return 1
"""


class UnknownDeadLetters(JobsError):
    """Some ids name no dead-lettered message; nothing was requeued."""

    def __init__(self, ids: Sequence[str], queues: Sequence[str]) -> None:
        super().__init__(
            f"no dead-lettered message {', '.join(ids)} on queue {', '.join(queues)}; "
            "list them with `python -m jobs dead-letters` (ids are the first column)"
        )
        self.ids = list(ids)


class UnknownQueue(JobsError):
    def __init__(self, queue: str, known: Iterable[str]) -> None:
        super().__init__(f"queue {queue!r} is not declared; use one of {', '.join(sorted(known))}")


@dataclass(frozen=True)
class QueueKeys:
    """Where Dramatiq's Redis broker (``dispatch.lua``) keeps one queue's messages."""

    namespace: str
    queue: str

    @property
    def ready(self) -> str:
        """List of ids waiting to be fetched."""
        return f"{self.namespace}:{self.queue}"

    @property
    def bodies(self) -> str:
        """Hash id → body of every message of the queue not yet acknowledged (waiting or fetched)."""
        return f"{self.namespace}:{self.queue}.msgs"

    @property
    def wakeups(self) -> str:
        """The project's broker: a token per queued message, that an idle consumer waits for (see
        ``JobsRedisBroker.wait_for_enqueue``)."""
        return f"{self.namespace}:{self.queue}.wakeups"

    @property
    def delayed_bodies(self) -> str:
        return f"{self.namespace}:{self.queue}.DQ.msgs"

    @property
    def dead(self) -> str:
        return f"{self.namespace}:{self.queue}.XQ"

    @property
    def dead_bodies(self) -> str:
        return f"{self.namespace}:{self.queue}.XQ.msgs"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


@dataclass(frozen=True)
class Body:
    """A dead-lettered body, decoded if it can be."""

    raw: bytes
    #: The decoded object when it is one (even a malformed message may still name its operation).
    fields: dict[str, Any] | None
    #: Why no worker can run it; None when it is a readable message.
    unreadable: str | None

    @classmethod
    def parse(cls, raw: bytes | None, queue: str, *, redis: bool = True) -> Body:
        if raw is None:
            return cls(b"", None, "its body is missing")
        try:
            fields = dramatiq.get_encoder().decode(raw)
        except Exception as error:
            cause = getattr(error, "error", None) or error
            return cls(raw, None, f"it does not decode: {type(cause).__name__}: {cause}")
        return cls(raw, fields if isinstance(fields, dict) else None, malformed_reason(fields, queue, redis=redis))

    @property
    def options(self) -> dict[str, Any]:
        options = (self.fields or {}).get("options")
        return options if isinstance(options, dict) else {}

    def get(self, name: str) -> Any:
        value = (self.fields or {}).get(name)
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class DeadLetter:
    #: The id it is stored under: what ``requeue`` takes.
    id: str
    queue: str
    dead_lettered_at: datetime
    #: Dramatiq's message id (the same for every attempt); None for an unreadable body.
    message_id: str | None
    actor: str | None
    operation_id: str | None
    #: Its operation's status now (None: no operation, or the operation's row is gone).
    operation_status: str | None
    resource: str | None
    #: Attempts before the one that failed for good.
    retries: int
    error: str
    error_source: ErrorSource
    traceback: str
    #: A step of an operation's plan (not a failure callback or a plain job): skipped when requeued
    #: once its operation has ended.
    is_step: bool

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "queue": self.queue,
            "dead_lettered_at": self.dead_lettered_at.isoformat(timespec="seconds"),
            "age_s": round(max(0.0, now - self.dead_lettered_at.timestamp()), 1),
            "message_id": self.message_id,
            "actor": self.actor,
            "operation_id": self.operation_id,
            "operation_status": self.operation_status,
            "resource": self.resource,
            "retries": self.retries,
            "error": self.error,
            "error_source": self.error_source,
            "traceback": self.traceback,
        }


@dataclass(frozen=True)
class DeadLetterListing:
    #: Dead letters per queue, all of them.
    counts: dict[str, int]
    #: The most recently dead-lettered first, at most the limit asked for.
    items: list[DeadLetter]

    def as_dict(self) -> dict[str, Any]:
        now = time.time()
        return {
            "counts": self.counts,
            "total": sum(self.counts.values()),
            "dead_letters": [item.as_dict(now) for item in self.items],
        }


@dataclass(frozen=True)
class Requeued:
    id: str
    queue: str
    outcome: Outcome
    #: What happens next, or why it was not requeued.
    detail: str
    operation_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue": self.queue,
            "outcome": self.outcome,
            "detail": self.detail,
            "operation_id": self.operation_id,
        }


@dataclass(frozen=True)
class OperationFacts:
    """What a dead letter shows of its operation, read once (the rows are not kept past the read)."""

    id: str
    status: str
    failed_step: str
    error_message: str
    error_traceback: str


def operations_of(ids: Iterable[str | None]) -> dict[str, OperationFacts]:
    wanted = sorted({i for i in ids if i})
    if not wanted:
        return {}
    columns = (
        Operation.id,
        Operation.status,
        Operation.failed_step,
        Operation.error_message,
        Operation.error_traceback,
    )
    with read_scope() as session:
        rows = session.execute(select(*columns).where(Operation.id.in_(wanted))).all()
    return {row[0]: OperationFacts(*row) for row in rows}


def _is_step(body: Body) -> bool:
    options = body.options
    return bool(options.get(OPTION_OPERATION)) and OPTION_NODE in options and OPTION_CALLBACK not in options


def operation_id_of(body: Body) -> str | None:
    value = body.options.get(OPTION_OPERATION)
    if isinstance(value, str) and value:
        return value
    return None


def _error(body: Body, operation: OperationFacts | None) -> tuple[str, ErrorSource, str]:
    if body.unreadable is not None:
        return f"unreadable: {body.unreadable}. Body: {preview(body.raw)}", "unreadable", ""
    actor = body.get("actor_name")
    # Only the failure the operation recorded for this very actor is this message's; a failure callback
    # or a step that failed after another one ended the operation keeps its own (unrecorded) error.
    if (
        operation is not None
        and operation.status != OperationStatus.RUNNING
        and operation.error_message
        and OPTION_CALLBACK not in body.options
        and operation.failed_step in (actor, _UNREADABLE_STEP)
    ):
        return operation.error_message, "operation", operation.error_traceback
    earlier = body.options.get("traceback")
    if isinstance(earlier, str) and earlier.strip():
        return f"earlier attempt: {_last_line(earlier)}", "earlier_attempt", earlier
    return NOT_RECORDED, "none", ""


def describe(
    message_id: str, queue: str, dead_lettered_at: datetime, body: Body, operations: dict[str, OperationFacts]
) -> DeadLetter:
    """One dead letter as listed, whichever broker kept it."""
    operation_id = operation_id_of(body)
    operation = operations.get(operation_id) if operation_id else None
    error, source, error_traceback = _error(body, operation)
    resource = body.options.get(OPTION_RESOURCE)
    retries = body.options.get("retries", 0)
    return DeadLetter(
        id=message_id,
        queue=queue,
        dead_lettered_at=dead_lettered_at,
        message_id=body.get("message_id"),
        actor=body.get("actor_name"),
        operation_id=operation_id,
        operation_status=operation.status if operation is not None else None,
        resource=resource if isinstance(resource, str) else None,
        retries=retries if isinstance(retries, int) else 0,
        error=error,
        error_source=source,
        traceback=error_traceback,
        is_step=_is_step(body),
    )


def fresh_message(body: Body, **options: Any) -> Message[Any]:
    """The message of a readable dead letter as it is requeued: its past attempts forgotten."""
    assert body.fields is not None
    kept = {k: v for k, v in body.options.items() if k not in _ATTEMPT_OPTIONS}
    return Message(**{**body.fields, "options": {**kept, **options}})


def what_next(body: Body, operations: dict[str, OperationFacts]) -> str:
    """What a worker does with a requeued dead letter."""
    operation_id = operation_id_of(body)
    if not _is_step(body) or operation_id is None:
        return "a worker runs it again"
    operation = operations.get(operation_id)
    if operation is None:
        return f"its operation {operation_id} no longer exists: a worker will skip it"
    if operation.status != OperationStatus.RUNNING:
        return (
            f"its operation {operation_id} already {operation.status}: a worker will skip this step; "
            "requeueing does not resume an operation, run it again instead"
        )
    return f"a worker runs it again as a step of operation {operation_id}, which is still running"


def give_back(broker: dramatiq.Broker, message: Message[Any]) -> None:
    """Undo what the enqueue hooks took for a message that was not requeued after all."""
    dedup = find_deduplicate(broker)
    if dedup is not None:
        dedup.give_back(broker, message)
    inflight = find_inflight(broker)
    if inflight is not None:
        inflight.after_nack(broker, message)


class QueueSelection:
    """The broker's declared queues (or ``queues``), and the ones a command names."""

    def __init__(self, broker: dramatiq.Broker, queues: Iterable[str] | None = None) -> None:
        self.broker = broker
        declared = {q for q in broker.get_declared_queues() if not q.endswith((".DQ", ".XQ"))}
        self.queues = sorted(declared if queues is None else set(queues))

    def _queues(self, queue: str | None) -> list[str]:
        if queue is None:
            return self.queues
        if queue not in self.queues:
            raise UnknownQueue(queue, self.queues)
        return [queue]


class DeadLetters(QueueSelection):
    """The dead letters of a Redis broker's declared queues (or of ``queues``)."""

    broker: RedisBroker

    def __init__(self, broker: dramatiq.Broker, queues: Iterable[str] | None = None) -> None:
        if not isinstance(broker, RedisBroker):
            fix = "use jobs.rabbitmq_dead_letters" if type(broker).__name__ == "RabbitmqBroker" else "unset JOBS_BROKER"
            raise JobsError(
                f"this command reads the Redis broker's dead letters; this process uses {type(broker).__name__}: {fix}"
            )
        super().__init__(broker, queues)
        self.client: redis.Redis = broker.client
        self._move = self.client.register_script(_MOVE)

    def keys(self, queue: str) -> QueueKeys:
        return QueueKeys(self.broker.namespace, queue)

    # -- looking -------------------------------------------------------------------------------------
    def counts(self, queue: str | None = None) -> dict[str, int]:
        names = self._queues(queue)
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zcard(self.keys(name).dead)
            return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))

    def listing(self, queue: str | None = None, *, limit: int = 50) -> DeadLetterListing:
        """The ``limit`` most recently dead-lettered messages (of ``queue``, else of every queue)."""
        names = self._queues(queue)
        counts = self.counts(queue)
        newest: list[tuple[float, str, str]] = []
        if limit > 0:
            with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.zrevrange(self.keys(name).dead, 0, limit - 1, withscores=True)
                for name, entries in zip(names, pipe.execute(), strict=True):
                    newest.extend((score, name, _text(member)) for member, score in entries)
        newest.sort(reverse=True)
        newest = newest[:limit]
        with self.client.pipeline(transaction=False) as pipe:
            for _score, name, message_id in newest:
                pipe.hget(self.keys(name).dead_bodies, message_id)
            bodies = [Body.parse(raw, name) for raw, (_s, name, _i) in zip(pipe.execute(), newest, strict=True)]
        operations = operations_of(operation_id_of(body) for body in bodies)
        items = [
            describe(message_id, name, datetime.fromtimestamp(score / 1000, UTC), body, operations)
            for (score, name, message_id), body in zip(newest, bodies, strict=True)
        ]
        return DeadLetterListing(counts, items)

    def find(self, ids: Sequence[str], queue: str | None = None) -> dict[str, str]:
        """The queue of each id that is dead-lettered (on ``queue``, else on any queue)."""
        names = self._queues(queue)
        found: dict[str, str] = {}
        with self.client.pipeline(transaction=False) as pipe:
            for message_id in ids:
                for name in names:
                    pipe.zscore(self.keys(name).dead, message_id)
            scores = iter(pipe.execute())
        for message_id in ids:
            for name in names:
                if next(scores) is not None and message_id not in found:
                    found[message_id] = name
        return found

    # -- requeueing ----------------------------------------------------------------------------------
    def requeue(self, ids: Sequence[str], queue: str | None = None) -> list[Requeued]:
        """Requeue these dead letters; raises UnknownDeadLetters (requeueing none) if any id is unknown."""
        unique = list(dict.fromkeys(ids))
        found = self.find(unique, queue)
        missing = [i for i in unique if i not in found]
        if missing:
            raise UnknownDeadLetters(missing, self._queues(queue))
        return self._requeue_all([(found[i], i) for i in unique])

    def requeue_all(self, queue: str | None = None) -> list[Requeued]:
        """Requeue every dead letter (of ``queue``, else of every queue), oldest first."""
        results: list[Requeued] = []
        for name in self._queues(queue):
            seen: set[str] = set()
            while True:
                # Unreadable ones stay dead-lettered: skip past them rather than read them again.
                batch = [
                    i
                    for i in (_text(m) for m in self.client.zrange(self.keys(name).dead, 0, _CHUNK + len(seen) - 1))
                    if i not in seen
                ]
                if not batch:
                    break
                seen.update(batch)
                results.extend(self._requeue_all([(name, i) for i in batch]))
        return results

    def _requeue_all(self, targets: Sequence[tuple[str, str]]) -> list[Requeued]:
        with self.client.pipeline(transaction=False) as pipe:
            for name, message_id in targets:
                pipe.hget(self.keys(name).dead_bodies, message_id)
            raws = pipe.execute()
        bodies = [Body.parse(raw, name) for raw, (name, _i) in zip(raws, targets, strict=True)]
        operations = operations_of(operation_id_of(body) for body in bodies)
        return [
            self._requeue_one(name, message_id, body, operations)
            for (name, message_id), body in zip(targets, bodies, strict=True)
        ]

    def _requeue_one(self, queue: str, message_id: str, body: Body, operations: dict[str, OperationFacts]) -> Requeued:
        operation_id = operation_id_of(body)
        if body.fields is None or body.unreadable is not None:
            if not body.raw:
                return Requeued(message_id, queue, "gone", "it is no longer dead-lettered", operation_id)
            return Requeued(
                message_id,
                queue,
                "unreadable",
                f"left dead-lettered: {body.unreadable}; a worker would dead-letter it again",
                operation_id,
            )
        # The id it is stored under stays: the consumer checks that a body names the id it is stored under.
        message = fresh_message(body, redis_message_id=message_id)
        try:
            self.broker.emit_before("enqueue", message, None)
        except DuplicateJob as duplicate:
            return Requeued(message_id, queue, "duplicate", f"left dead-lettered: {duplicate}", operation_id)
        keys = self.keys(queue)
        moved = int(
            self._move(
                keys=[keys.dead, keys.dead_bodies, keys.ready, keys.bodies, keys.wakeups],
                args=[message_id, body.raw, message.encode()],
            )
        )
        if moved != 1:
            if moved != 2:  # nothing of this message is queued: give back what the hooks took for it
                give_back(self.broker, message)
            detail = {
                2: "requeued meanwhile by someone else",
                3: "requeued and dead-lettered again meanwhile; list the dead letters again",
            }.get(moved, "it is no longer dead-lettered")
            return Requeued(message_id, queue, "gone", detail, operation_id)
        self.broker.emit_after("enqueue", message, None)
        return Requeued(message_id, queue, "requeued", what_next(body, operations), operation_id)
