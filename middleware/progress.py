"""An operation's progress in the database: which steps may run, what follows a completed step, and
what happens once when a step fails for good.

Every function that writes takes the operation's row lock first (``SELECT … FOR UPDATE``; SQLite
serializes writers), so concurrent steps of one operation — a group's members finishing together — see
each other's completions, and the last one to finish is the only one that moves on.

A step is done when the database has a row for it, or when a chain marked it in Redis (``step_marks``): the
callers read the marks and pass them in (``marked``, plan path → completion time), and the first write
that takes the operation's row lock copies them into the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dramatiq import Broker, Message
from sqlalchemy import (
    Connection,
    DateTime,
    Executable,
    String,
    bindparam,
    column,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from resources.after_commit import on_commit
from resources.db import get_engine
from resources.metrics import operation_ended, operation_ended_as, operation_ended_now
from resources.models import Operation, OperationStatus, StepDone, utcnow
from resources.quick_statements import QuickStatements, quick_autocommit, quick_write
from resources.transitions import record_error

from .plan import advance, finishing_alone, message_of, start_paths

__all__ = [
    "Outgoing",
    "Progress",
    "StepCheck",
    "check_step",
    "complete_step",
    "enqueue_all",
    "fail_operation",
    "finish_without_session",
    "first_steps",
    "outgoing_of",
    "pending_after",
    "runs_without_record",
]

logger = logging.getLogger(__name__)

#: What the reads here run on: a session, a Connection, or a pooled driver connection (``resources.quick_statements``).
Reader = Session | Connection | QuickStatements


@dataclass(frozen=True)
class Outgoing:
    """A message to enqueue, and its delay in milliseconds (None: at once)."""

    message: Message
    delay: int | None = None


def outgoing_of(plan: dict, paths: list[str], extra_delay: int | None = None) -> list[Outgoing]:
    """The messages of steps ``paths`` of ``plan``."""
    result = []
    for path in paths:
        message = message_of(plan["root"], path)
        delay = message.options.get("delay")
        if extra_delay:
            delay = (delay or 0) + extra_delay
        result.append(Outgoing(message, delay))
    return result


def enqueue_all(broker: Broker, outgoing: Iterable[Outgoing]) -> None:
    for item in outgoing:
        broker.enqueue(item.message, delay=item.delay)


def deferring(broker: Broker, client: Any) -> Callable[[], AbstractContextManager[list[Any]]] | None:
    """The broker's ``defer_enqueues`` (the project's Redis broker) when its messages live on ``client``'s Redis
    server, so that their stores can go in a round trip of ``client``'s; None otherwise (a RabbitMQ broker,
    another server)."""
    defer = getattr(broker, "defer_enqueues", None)
    shares_server = getattr(broker, "shares_server", None)
    return defer if defer is not None and shares_server is not None and shares_server(client) else None


@dataclass(frozen=True)
class Progress:
    """What a step's outcome leads to: messages to send, and whether the operation just ended."""

    outgoing: list[Outgoing]
    ended: bool = False
    #: The operation's plan, when a completion was recorded (a step chain goes on with it).
    plan: dict | None = None


@dataclass(frozen=True)
class StepCheck:
    """Whether a delivered step may run. ``skip`` is why not; ``ended`` says its operation is over.

    A step delivered again after it completed may be the only trace of a worker killed between recording
    it and sending what follows: ``follow_up`` is what its completion led to, to send again where it has not
    completed (the caller leaves out what was sent already), and ``succeeded`` says the operation
    ended well, so its throttle slot must be free (releasing is idempotent)."""

    skip: str | None = None
    ended: bool = False
    follow_up: list[Outgoing] = field(default_factory=list)
    succeeded: bool = False
    #: The operation's plan, for a step that may run (its completion may then be marked, see ``step_marks``).
    plan: dict | None = None
    #: The marks the check went by, for a step that may run: with no group above the step, they and the marks
    #: its chain makes are all the marks its operation can have (see ``OperationTransitions``).
    marked: Mapping[str, datetime] = field(default_factory=dict)


#: No step marked in Redis.
NO_MARKS: Mapping[str, datetime] = {}


def first_steps(plan: dict, countdown_ms: int | None = None) -> list[Outgoing]:
    """The messages that start an operation (the countdown delays only these, as in Waldur)."""
    if plan["root"] is None:
        return []
    return outgoing_of(plan, start_paths(plan["root"], ""), countdown_ms)


def _locked(session: Session, operation_id: str) -> Operation | None:
    return session.scalars(select(Operation).where(Operation.id == operation_id).with_for_update()).one_or_none()


# The statements run for every step, built once and on the tables rather than the mapped classes: building a
# statement, and the ORM's handling of one, cost more than running it on SQLite (SQLAlchemy caches the
# compiled form, not the expression).
_OPERATIONS = Operation.__table__
_STEPS_DONE = StepDone.__table__
_RECORDED_PATHS = select(_STEPS_DONE.c.path).where(_STEPS_DONE.c.operation_id == bindparam("operation_id"))
#: The record of one step of one operation, if any.
_THIS_STEP = (_STEPS_DONE.c.operation_id == bindparam("operation_id"), _STEPS_DONE.c.path == bindparam("path"))
_STEP_RECORDED = select(_STEPS_DONE.c.path).where(*_THIS_STEP).exists()
_CHECK = select(_OPERATIONS.c.status, _STEP_RECORDED, _OPERATIONS.c.plan).where(
    _OPERATIONS.c.id == bindparam("operation_id")
)
_STEP_RECORDED_AT = select(_STEPS_DONE.c.done_at).where(*_THIS_STEP).scalar_subquery()
_STATUS_AND_RECORD = select(_OPERATIONS.c.status, _STEP_RECORDED_AT).where(
    _OPERATIONS.c.id == bindparam("operation_id")
)
_CHECK_NO_PATH = select(_OPERATIONS.c.status, literal(False), _OPERATIONS.c.plan).where(
    _OPERATIONS.c.id == bindparam("operation_id")
)
_LOCK_RUNNING = (
    select(_OPERATIONS.c.status, _OPERATIONS.c.plan, _OPERATIONS.c.executor, _OPERATIONS.c.created_at)
    .where(_OPERATIONS.c.id == bindparam("operation_id"))
    .with_for_update()
)
# Not evaluated on the session's objects, as the ORM's update would: see _expire_loaded.
_SUCCEED = (
    update(_OPERATIONS)
    .where(_OPERATIONS.c.id == bindparam("operation_id"))
    .values(status=OperationStatus.SUCCEEDED, finished_at=bindparam("finished_at"), first_steps_since=None)
)
_INSERT_STEPS = insert(_STEPS_DONE)
# The last step's record when no group is above it (see _finish): the update is the check that the operation
# still runs, and rows already recorded (marks copied by an earlier record) are passed over.
_FINISH = (
    update(_OPERATIONS)
    .where(_OPERATIONS.c.id == bindparam("operation_id"), _OPERATIONS.c.status == OperationStatus.RUNNING)
    .values(status=OperationStatus.SUCCEEDED, finished_at=bindparam("finished_at"), first_steps_since=None)
    .returning(_OPERATIONS.c.executor, _OPERATIONS.c.created_at)
)
_INSERT_NEW_STEPS = {
    "postgresql": postgresql.insert(_STEPS_DONE).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(_STEPS_DONE).on_conflict_do_nothing(),
}


def _expire_loaded(session: Session, operation_id: str) -> None:
    """After an update that bypassed the session's objects: a loaded Operation (a sync-mode executor's, in
    the caller's session) is read again on its next use instead of keeping its old status."""
    loaded = session.identity_map.get(session.identity_key(Operation, operation_id))
    if loaded is not None:
        session.expire(loaded, ["status", "finished_at"])


def _recorded_paths(session: Reader, operation_id: str) -> set[str]:
    return set(session.scalars(_RECORDED_PATHS, {"operation_id": operation_id}))


def _rows_of_marks(operation_id: str, marked: Mapping[str, datetime], recorded: set[str]) -> list[dict]:
    """StepDone rows for the marked steps the database does not have yet, with the time each completed."""
    return [{"operation_id": operation_id, "path": p, "done_at": at} for p, at in marked.items() if p not in recorded]


def runs_without_record(session: Reader, operation_id: str, path: str, marked_at: datetime) -> bool:
    """Does the operation still run, with no record of step ``path`` in the database but the one of its mark at
    ``marked_at``? ``check_step``'s question without its plan, which is most of what it reads. A sibling step's
    completion records the operation's marks (``complete_step``), so a step just marked may find itself recorded
    with its own mark's time: that record is its own, not another copy's."""
    row = session.execute(_STATUS_AND_RECORD, {"operation_id": operation_id, "path": path}).one_or_none()
    if row is None or row[0] != OperationStatus.RUNNING:
        return False
    recorded_at = row[1]
    return recorded_at is None or recorded_at == marked_at


def check_step(
    session: Reader, operation_id: str, path: str | None, marked: Mapping[str, datetime] = NO_MARKS
) -> StepCheck:
    """May step ``path`` of this operation run now? Not when its operation has ended, nor when it has
    completed already (a duplicate delivery, or a redelivery after a crash: see ``StepCheck.follow_up``).
    One query in the common case: the step is new (its answer has the plan)."""
    if path is None:
        row = session.execute(_CHECK_NO_PATH, {"operation_id": operation_id}).one_or_none()
    else:
        row = session.execute(_CHECK, {"operation_id": operation_id, "path": path}).one_or_none()
    if row is None:
        return StepCheck(skip=f"operation {operation_id} does not exist", ended=True)
    status, completed, plan = row
    if status != OperationStatus.RUNNING:
        succeeded = status == OperationStatus.SUCCEEDED
        return StepCheck(skip=f"operation {operation_id} already {status}", ended=True, succeeded=succeeded)
    if completed or path in marked:
        assert path is not None
        return StepCheck(
            skip=f"step {path} of operation {operation_id} already completed (duplicate delivery)",
            follow_up=_follow_up(session, operation_id, plan, path, marked),
        )
    return StepCheck(plan=plan, marked=marked)


def _follow_up(
    session: Reader, operation_id: str, plan: dict, path: str, marked: Mapping[str, datetime]
) -> list[Outgoing]:
    """The steps that the completion of ``path`` started and that have not completed yet. A started step
    that has completed was chained (run by the same worker, never sent): what it started is followed too."""
    if plan["root"] is None:
        return []
    done = _recorded_paths(session, operation_id) | set(marked)
    return outgoing_of(plan, pending_after(plan["root"], done, path))


def pending_after(root: dict, done: set[str], path: str) -> list[str]:
    """The steps not in ``done`` that the completion of ``path`` started, directly or through started steps
    that are in ``done``. Pure."""
    pending, completed, seen = [], [path], {path}
    while completed:
        for started in advance(root, done, completed.pop()).start:
            if started in seen:
                continue
            seen.add(started)
            (completed if started in done else pending).append(started)
    return pending


def complete_step(
    session: Session,
    operation_id: str,
    path: str,
    marked: Mapping[str, datetime] = NO_MARKS,
    *,
    plan: dict | None = None,
) -> Progress:
    """Record step ``path`` as done, with the steps ``marked`` before it, and return what to enqueue next
    (nothing for a duplicate). Once per operation and step: statements on columns, not ORM objects, whose
    bookkeeping would cost more than the statements. With the operation's ``plan`` (a worker has it from the
    step's check), the last step of an operation with no group above it takes two statements instead of four."""
    if plan is not None and plan["root"] is not None:
        completed = finishing_alone(plan["root"], path)
        dialect = session.get_bind().dialect
        insert_new = _INSERT_NEW_STEPS.get(dialect.name) if dialect.update_returning else None
        if completed is not None and insert_new is not None:
            return _finish(session, operation_id, marked, completed, plan, insert_new)
    row = session.execute(_LOCK_RUNNING, {"operation_id": operation_id}).one_or_none()
    if row is None or row.status != OperationStatus.RUNNING:
        return Progress([])
    # A statement of its own, after the lock: in PostgreSQL's READ COMMITTED, one that waited for the lock reads
    # the rest of its select (a subquery of recorded steps) as of its start, missing the steps the lock's last
    # holder recorded.
    recorded = _recorded_paths(session, operation_id)
    if path in recorded or path in marked:
        logger.info("step %s of operation %s completed twice; the second completion is ignored", path, operation_id)
        return Progress([])
    step = advance(row.plan["root"], recorded | set(marked), path)
    now = utcnow()
    rows = _rows_of_marks(operation_id, marked, recorded)
    rows.extend({"operation_id": operation_id, "path": p, "done_at": now} for p in step.completed)
    session.execute(_INSERT_STEPS, rows)
    if step.finished:
        session.execute(_SUCCEED, {"operation_id": operation_id, "finished_at": now})
        _expire_loaded(session, operation_id)
        _ended_well(session, operation_id, row.executor, row.created_at, now)
    return Progress(outgoing_of(row.plan, step.start), ended=step.finished, plan=row.plan)


def _finish(
    session: Session,
    operation_id: str,
    marked: Mapping[str, datetime],
    completed: list[str],
    plan: dict,
    insert_new: Executable,
) -> Progress:
    """``complete_step`` for a step whose completion ends the operation whatever else is recorded: no read, and
    no row lock taken first. The update ending the operation is the check that it still ran: it waits for the
    row lock of a concurrent end (a cancel, a failure, another copy of this step finishing it) and then finds
    the operation ended, changing nothing. What else is recorded cannot change what this completion leads to:
    no group is above the step, and every step before it had completed before it was sent."""
    now = utcnow()  # (``path`` itself is never marked: only a step with a successor in its sequence is)
    ended = session.execute(_FINISH, {"operation_id": operation_id, "finished_at": now}).one_or_none()
    if ended is None:
        return Progress([])
    rows = [{"operation_id": operation_id, "path": p, "done_at": at} for p, at in marked.items()]
    rows.extend({"operation_id": operation_id, "path": p, "done_at": now} for p in completed)
    session.execute(insert_new, rows)
    _expire_loaded(session, operation_id)
    _ended_well(session, operation_id, ended.executor, ended.created_at, now)
    return Progress([], ended=True, plan=plan)


# ``_finish`` as one PostgreSQL statement: the update ends the operation if it still runs, and the insert takes
# its rows from the update's answer, so they are written only if it did (a statement's data-modifying WITH
# queries commit together).
_ENDED = _FINISH.returning(_OPERATIONS.c.id).cte("ended")
_DONE = (
    func.unnest(
        bindparam("paths", type_=postgresql.ARRAY(String)), bindparam("done_at", type_=postgresql.ARRAY(DateTime))
    )
    .table_valued(column("path", String), column("done_at", DateTime))
    .render_derived("done")
)
_RECORDED = (
    postgresql.insert(_STEPS_DONE)
    .from_select(
        ["operation_id", "path", "done_at"],
        select(_ENDED.c.id, _DONE.c.path, _DONE.c.done_at).select_from(_ENDED).join(_DONE, true()),
    )
    .on_conflict_do_nothing()
    .cte("recorded")
)
_FINISH_IN_ONE = select(_ENDED.c.executor, _ENDED.c.created_at).add_cte(_RECORDED)


def finish_without_session(
    operation_id: str, path: str, marked: Mapping[str, datetime], plan: dict | None
) -> Progress | None:
    """``complete_step`` for a step whose completion ends the operation whatever else is recorded (see
    ``_finish``), without a session's bookkeeping: on PostgreSQL one autocommitted statement, one database round
    trip instead of four (BEGIN, update, insert, COMMIT); on SQLite ``_finish``'s two statements in a write
    transaction of ``quick_write``, which holds the write turn for less time. None when it does not apply (a
    caller's transaction, another step): ``complete_step`` it is then."""
    completed = finishing_alone(plan["root"], path) if plan is not None and plan["root"] is not None else None
    if completed is None:
        return None
    now = utcnow()
    rows = [*marked.items(), *((p, now) for p in completed)]
    with quick_autocommit() as statements:
        if statements is not None:
            parameters = {"paths": [p for p, _ in rows], "done_at": [at for _, at in rows]}
            ended = statements.execute(
                _FINISH_IN_ONE, {"operation_id": operation_id, "finished_at": now, **parameters}
            ).one_or_none()
            return _ended_without_session(operation_id, ended, now, plan)
    if not get_engine().dialect.update_returning:
        return None  # a SQLite before 3.35 (no RETURNING): complete_step's four statements
    with quick_write() as statements:
        if statements is None:
            return None
        ended = statements.execute(_FINISH, {"operation_id": operation_id, "finished_at": now}).one_or_none()
        if ended is not None:
            insert_rows = [{"operation_id": operation_id, "path": p, "done_at": at} for p, at in rows]
            statements.executemany(_INSERT_NEW_STEPS["sqlite"], insert_rows)
    return _ended_without_session(operation_id, ended, now, plan)


def _ended_without_session(operation_id: str, ended: Any, now: datetime, plan: dict | None) -> Progress:
    """What ``finish_without_session`` returns, once committed: ``ended`` is the operation's executor and creation
    time if this completion ended it."""
    if ended is None:
        return Progress([])
    executor, created_at = ended
    operation_ended_now(executor, OperationStatus.SUCCEEDED, created_at, now)
    logger.info("operation %s (%s) succeeded", operation_id, executor)
    return Progress([], ended=True, plan=plan)


def _ended_well(session: Session, operation_id: str, executor: str, created_at: datetime, now: datetime) -> None:
    operation_ended_as(session, executor, OperationStatus.SUCCEEDED, created_at, now)
    # Once committed: a log line written while this transaction holds SQLite's one writer lets other threads
    # take the GIL, and the other writers wait the longer.
    on_commit(session, lambda: logger.info("operation %s (%s) succeeded", operation_id, executor))


def fail_operation(
    session: Session,
    operation_id: str,
    step_name: str,
    error_message: str,
    error_traceback: str,
    *,
    status: str = OperationStatus.FAILED,
    marked: Mapping[str, datetime] = NO_MARKS,
) -> Progress:
    """Fail (or cancel) the operation once: store the error on it and on every resource whose part did
    not finish (``marked`` steps count as finished, and are recorded), and return the failure callbacks to
    enqueue. A second call (another member of a group failing, a duplicate delivery) finds the operation no
    longer running: nothing to do, not ended."""
    operation = _locked(session, operation_id)
    if operation is None or operation.status != OperationStatus.RUNNING:
        return Progress([])
    operation.status = status
    operation.finished_at = utcnow()
    operation.first_steps_since = None
    operation.failed_step = step_name[:200]
    operation.error_message = error_message
    operation.error_traceback = error_traceback
    operation_ended(session, operation)
    recorded = _recorded_paths(session, operation_id)
    if rows := _rows_of_marks(operation_id, marked, recorded):
        session.execute(insert(StepDone), rows)
    done = recorded | set(marked)
    callbacks: list[Outgoing] = []
    for party in operation.plan["parties"]:
        if party["path"] is not None and party["path"] in done:
            continue  # this resource's part finished before the failure
        record_error(session, party["ref"], operation_id, error_message, error_traceback)
        callbacks.extend(Outgoing(Message(**m)) for m in party["on_failure"])
    logger.warning("operation %s (%s) %s at %s: %s", operation_id, operation.executor, status, step_name, error_message)
    return Progress(callbacks, ended=True)
