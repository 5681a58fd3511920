"""Operation transitions: move an operation along its plan as its steps succeed, and fail it once when
a step fails for good; gate every step through the throttle.

Must sit *before* Retries in the middleware list: ``after_*`` hooks run in reverse order, so ours then
runs after Retries has decided, and ``message.failed`` tells a final failure from an attempt that will
be retried (Dramatiq has no "failed for good" hook; Callbacks' ``on_failure`` fires on every attempt).
"""

from __future__ import annotations

import contextvars
import logging
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware, SkipMessage
from sqlalchemy.orm import Session

from resources.config import get_settings
from resources.db import session_scope
from resources.models import OperationStatus
from resources.quick_statements import quick_reads
from resources.redis_client import ScriptCall, get_redis, run_calls
from resources.sqlite_turns import write_in_background_lane

from .chain import StepChain
from .context import StepContext, current_step, set_step_context
from .inflight import find_inflight
from .outbox import deliver, stage
from .outbox_claims import claim_key
from .outbox_claims import forget as forget_claims
from .plan import OPTION_CALLBACK, OPTION_NODE, OPTION_OPERATION, OPTION_THROTTLE, finishing_alone, next_in_sequence
from .progress import (
    Progress,
    Reader,
    StepCheck,
    check_step,
    complete_step,
    enqueue_all,
    fail_operation,
    finish_without_session,
    outgoing_of,
    runs_without_record,
)
from .step_marks import StepMarks, completed_at
from .throttle import Throttle, find_throttle
from .transient import Unavailable, retry_in_place

__all__ = ["OperationTransitions", "describe_error", "end_operation", "enqueue_all", "forget_marks"]

logger = logging.getLogger(__name__)

#: What a delivered step's check read, by message id: the plan (its completion decides from it whether to chain)
#: and the operation's marks.
_CHECKED: contextvars.ContextVar[tuple[str, StepCheck]] = contextvars.ContextVar("checked_step")


def _finishes_alone(plan: dict, path: str) -> bool:
    return plan["root"] is not None and finishing_alone(plan["root"], path) is not None


def describe_error(exception: BaseException) -> str:
    text = str(exception)
    return text if text else type(exception).__name__


def end_operation(
    broker: dramatiq.Broker,
    operation_id: str,
    step_name: str,
    reason: str,
    *,
    status: str = OperationStatus.FAILED,
    marks: StepMarks | None = None,
) -> bool:
    """End a running operation from outside its steps (a cancel, a message no worker can run): fail it
    once with ``reason``, then release its slot and send its failure callbacks. False if it had ended."""
    marks = marks or StepMarks()
    marks.stop_chains(operation_id)  # before the commit: no chain of the operation may miss it
    marked = marks.paths(operation_id)
    with session_scope() as session:
        progress = fail_operation(session, operation_id, step_name, reason, "", status=status, marked=marked)
        outbox_id = stage(session, operation_id, progress.outgoing, release_throttle=progress.ended)
    deliver(broker, outbox_id, operation_id)
    if progress.ended:
        forget_marks(broker, operation_id, marks)
    return progress.ended


def _keys_to_forget(broker: dramatiq.Broker, operation_id: str, marks: StepMarks) -> list[str] | None:
    """An ended operation's marks, in-flight names and first steps' claim, when they are all on the marks' server
    (None if not)."""
    if marks.client is not get_redis():
        return None
    inflight = find_inflight(broker)
    if inflight is None:
        return [*marks.keys_of(operation_id), claim_key(operation_id)]
    if inflight.client is marks.client:
        return [*marks.keys_of(operation_id), claim_key(operation_id), *inflight.keys_of(operation_id)]
    return None


def forget_marks(broker: dramatiq.Broker, operation_id: str, marks: StepMarks) -> None:
    """Drop an ended operation's step marks, sent marks, in-flight names and first steps' claim (its steps are in
    the database by then, and its row no longer marks its first steps); best effort, as their expiry removes them
    anyway."""
    try:
        keys = _keys_to_forget(broker, operation_id, marks)
        if keys is not None:
            marks.client.delete(*keys)
        else:
            inflight = find_inflight(broker)
            if inflight is not None:
                inflight.forget(operation_id)
            marks.forget(operation_id)
            forget_claims([operation_id])
    except Exception as error:
        logger.info("operation %s: marks left to expire (%s)", operation_id, error)


class OperationTransitions(Middleware):
    """Runs each operation's plan: next steps on success, failure callbacks once on final failure,
    no step of an operation that has already ended, and no step of a throttled operation without its
    slot."""

    def __init__(
        self,
        sessions: Callable[[], AbstractContextManager[Session]] = session_scope,
        throttle: Throttle | None = None,
        read_sessions: Callable[[], AbstractContextManager[Reader]] = quick_reads,
        chain_budget_s: float | None = None,
        marks: StepMarks | None = None,
    ) -> None:
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.throttle = throttle
        self.marks = marks or StepMarks()
        self.chain = StepChain(get_settings().step_chain_s if chain_budget_s is None else chain_budget_s)

    @staticmethod
    def _is_step(message: Message[Any]) -> bool:
        options = message.options
        return OPTION_OPERATION in options and OPTION_NODE in options and OPTION_CALLBACK not in options

    def before_process_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        context = StepContext.from_options(message.options)
        set_step_context(context)
        if not self._is_step(message):
            return
        operation_id, path = message.options[OPTION_OPERATION], message.options[OPTION_NODE]
        # A chained step's check was its predecessor's record, just made (see middleware.chain).
        if self.chain.is_chained(message):
            check = StepCheck()
        else:
            check = self._check(operation_id, path)
            _CHECKED.set((message.message_id, check))
        if check.skip is not None:
            logger.info("skipping %s: %s", message, check.skip)
            try:
                self._finish_what_a_crash_left(broker, message, check)
            except Exception as error:  # not sent: this message must come back to try again
                raise Unavailable(f"could not send what follows step {path} of {operation_id}: {error}") from error
            raise SkipMessage(check.skip)
        if self.chain.is_chained(message) and self.chain.keeps_slot(message):
            # Its operation holds the slot of the step that started the chain: that step's message, still
            # unacknowledged, keeps it (a queued step's slot does not expire), and the record of the step
            # before this one stopped the chain if a cancel released it.
            set_step_context(context.with_fence(self.chain.fence))
        elif self.throttle is not None:
            fence = self.throttle.before_step(broker, message)
            set_step_context(context.with_fence(fence))

    def _check(self, operation_id: str, path: str) -> StepCheck:
        try:
            marked = self.marks.paths(operation_id)
            with self.read_sessions() as session:
                return check_step(session, operation_id, path, marked)
        except Exception as error:  # Dramatiq would log it and run the step unchecked
            raise Unavailable(f"could not check step {path} of operation {operation_id}: {error}") from error

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        # A worker process: on SQLite, its writes give way to those of the processes that serve requests.
        write_in_background_lane()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.chain.stopping.clear()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.chain.stopping.set()  # a stop waits for the steps under way, not for whole chains

    def after_skip_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        set_step_context(None)

    def after_nack(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        """A message for an actor this worker does not know is dead-lettered by Dramatiq without running
        any after-process hook: end its operation here, or it would wait for that step forever."""
        operation_id = message.options.get(OPTION_OPERATION)
        if message.actor_name in broker.actors or not operation_id:
            return  # a known step that failed for good was handled in after_process_message
        reason = (
            f"message {message.message_id} names actor {message.actor_name!r}, which this worker does not "
            f"declare; it was dead-lettered on queue {message.queue_name!r}. Deploy the code that declares the "
            "actor to every worker of that queue, then requeue the message or run the operation again"
        )
        logger.error("operation %s: %s", operation_id, reason)
        end_operation(broker, operation_id, message.actor_name, reason)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Message[Any],
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        fence = current_step().throttle_fence
        set_step_context(None)
        if not self._is_step(message):
            if exception is not None and message.failed and message.options.get(OPTION_CALLBACK):
                logger.error(
                    "failure callback %s of operation %s failed: %s",
                    message,
                    message.options.get(OPTION_OPERATION),
                    describe_error(exception),
                )
            return
        operation_id, path = message.options[OPTION_OPERATION], message.options[OPTION_NODE]
        # The step is over: once no step of its operation runs here, its lease stops expiring, before the outcome
        # is recorded (see Throttle.after_step). With the record of a chained step's mark when there is one.
        queued = self.throttle.after_step(message) if self.throttle is not None else None
        if exception is not None and not message.failed:
            self._lease_queued(queued)
            return  # Retries will deliver it again; not a failure yet.
        # The step has had its effect: record it even through a database or broker blip, its message
        # unacknowledged meanwhile (a worker killed here has it delivered again, and the duplicate is harmless).
        what = f"step {path} of operation {operation_id}"
        # Decided once: a retry of the record after its mark must not change its mind (say, the worker began
        # to shut down meanwhile), or it would find its own mark and take the step for a duplicate.
        chained_next = self._chained_next(broker, message, path) if exception is None else None
        if chained_next is None:
            self._lease_queued(queued)
            queued = None
        if exception is not None:
            outbox_id = retry_in_place(
                lambda: self._record_failure(message, operation_id, exception), f"failing {what}"
            )
            deliver(broker, outbox_id, operation_id)
            forget_marks(broker, operation_id, self.marks)
            return
        # This completion's name and time in its step mark, the same through every retry.
        marker, at = uuid.uuid4().hex, time.time()
        progress, successor, marked = retry_in_place(
            lambda: self._record_success(broker, message, operation_id, path, chained_next, (marker, at), queued),
            f"recording {what}",
        )
        if successor is not None:
            self.chain.run(broker, successor, progress, fence=fence, marked=marked)
            return
        # Sent after the commit and before this step's message is acknowledged: a worker killed in between
        # leaves this message to be delivered again, and its check sends what follows then. No outbox row,
        # which would cost a second write transaction per step, unless the broker cannot take the messages.
        try:
            self._send(broker, operation_id, progress)
        except Exception as error:
            logger.warning(
                "could not send what follows %s (%s: %s); the outbox relay sends it once the broker answers",
                what,
                type(error).__name__,
                error,
            )
            retry_in_place(lambda: self._stage(operation_id, progress), f"keeping what follows {what} for the relay")

    def _chained_next(
        self, broker: dramatiq.Broker, message: Message[Any], path: str
    ) -> tuple[Progress, Message[Any]] | None:
        """When step ``path`` is in the middle of a sequence and this worker will run the step after it: what
        its completion leads to, and that step. The plan says what follows; nothing is read."""
        plan = self._plan_of(message)
        following = next_in_sequence(plan["root"], path) if plan is not None else None
        if plan is None or following is None:
            return None
        progress = Progress(outgoing_of(plan, following), plan=plan)
        successor = self.chain.successor(broker, message, progress)
        return None if successor is None else (progress, successor)

    def _plan_of(self, message: Message[Any]) -> dict | None:
        """The plan of the step's operation, as its check (or, for a chained step, its chain) read it."""
        if self.chain.is_chained(message):
            return self.chain.plan
        checked = _CHECKED.get(None)
        return checked[1].plan if checked is not None and checked[0] == message.message_id else None

    def _marks_known(self, message: Message[Any]) -> dict[str, datetime] | None:
        """The operation's marks as this worker knows them without asking Redis: those the check of its chain's
        first step (or of this delivered step) read, and those its chain made since; None if unknown.

        With no group above the step they are all its operation has: steps before the checked one were marked
        before the check (a step starts only once its predecessor is recorded), and a mark of a later step by
        another copy of it (a duplicate delivery) refuses this chain's own mark of that step, stopping it there."""
        if self.chain.is_chained(message):
            return self.chain.marked
        checked = _CHECKED.get(None)
        return dict(checked[1].marked) if checked is not None and checked[0] == message.message_id else None

    def _record_success(
        self,
        broker: dramatiq.Broker,
        message: Message[Any],
        operation_id: str,
        path: str,
        chained_next: tuple[Progress, Message[Any]] | None,
        mark: tuple[str, float],
        queued: ScriptCall | None = None,
    ) -> tuple[Progress, Message[Any] | None, dict[str, datetime] | None]:
        """Record the step (``mark``: the marker and time of its mark, if it gets one; ``queued``: the throttle's
        call to make in the mark's round trip); return what follows it, the step this worker runs next (None: send
        it) and, for that step, the operation's marks if known."""
        # When the step after this one runs here next, a mark in Redis records this one (see
        # middleware.step_marks): no transaction, and on SQLite no turn at the one writer. Refused once the
        # operation is being ended, or when another copy of the step marked it first: recorded below then, which
        # finds it ended or done and starts nothing.
        marker, at = mark
        along = [queued] if queued is not None else []
        delivered = not self.chain.is_chained(message)
        alive_key = self._alive_key(broker, operation_id) if delivered else None
        if chained_next is not None and self.marks.record(
            operation_id, path, marker, at, along=along, alive_key=alive_key
        ):
            # A delivered step marked while its operation's in-flight set was there needs no read: see
            # StepMarks.record. Without that set on the marks' server, the database says.
            if not delivered or alive_key is not None or self._still_to_record(operation_id, path, completed_at(at)):
                known = self._marks_known(message)
                return *chained_next, None if known is None else {**known, path: completed_at(at)}
            self.marks.unmark(operation_id, path)
            logger.info("step %s of operation %s completed twice; the second completion is ignored", path, operation_id)
            return Progress([]), None, None
        plan = self._plan_of(message)
        # The last step of a sequence with no group above it knows its operation's marks; any other step reads
        # them, as marks of its siblings may have come since its check.
        known = self._marks_known(message) if plan is not None and _finishes_alone(plan, path) else None
        if delivered and chained_next is None and plan is not None and next_in_sequence(plan["root"], path):
            # Another copy of this step could run its successor itself, marking the step with no read of the
            # database: taken here first, that copy finds it taken. Taken or not, this completion is recorded below,
            # where a record of another copy, made first, makes it a duplicate.
            _took, marked = self.marks.take(operation_id, path, marker)
        else:
            marked = self.marks.paths(operation_id) if known is None else known
        # The last step of an operation on PostgreSQL: one statement, committed on its own (not with sessions a
        # caller gave, which may join or watch a transaction).
        progress = finish_without_session(operation_id, path, marked, plan) if self.sessions is session_scope else None
        if progress is None:
            with self.sessions() as session:
                progress = complete_step(session, operation_id, path, marked, plan=plan)
        return progress, self.chain.successor(broker, message, progress), None

    def _alive_key(self, broker: dramatiq.Broker, operation_id: str) -> str | None:
        """The operation's in-flight set when it is on the marks' server (its end then drops the two together, or
        the set first; see ``forget_marks``), for ``StepMarks.record``; None otherwise."""
        inflight = find_inflight(broker)
        if inflight is None or inflight.client is not self.marks.client:
            return None
        return inflight.names_key(operation_id)

    def _lease_queued(self, queued: ScriptCall | None) -> None:
        """Make the throttle's call of ``Throttle.after_step`` on its own (its failure is logged: the slot stays
        taken, the lease expiring; the heartbeat's reaping then hands it on)."""
        if queued is None or self.throttle is None:
            return
        try:
            run_calls(self.throttle.store.client, [queued])
        except Exception as error:
            logger.warning("could not mark a step's lease queued (%s: %s)", type(error).__name__, error)

    def _still_to_record(self, operation_id: str, path: str, marked_at: datetime) -> bool:
        """After marking a delivered step at ``marked_at`` without its operation's in-flight set on the marks' server
        (with it, the mark says so; see ``StepMarks.record``): does its operation still run, without a record of the
        step other than of that mark? A copy of the step delivered twice (first steps sent again) may have run beside
        this one, finished first, been recorded in the database, and even ended the operation, its marks then
        dropped. But a sibling step finishing meanwhile records every mark it finds, this one's too, and that
        record is this completion's own. A chained step needs no such read: it follows the one record of its
        predecessor."""
        with self.read_sessions() as session:
            return runs_without_record(session, operation_id, path, marked_at)

    def _record_failure(self, message: Message[Any], operation_id: str, exception: BaseException) -> str | None:
        """Fail the operation and stage its failure callbacks and the slot's release in the outbox, in one
        transaction (they must run even if this worker dies now); returns the outbox row to deliver."""
        self.marks.stop_chains(operation_id)  # a chain of a sibling step stops before its next step
        marked = self.marks.paths(operation_id)
        with self.sessions() as session:
            error_traceback = "".join(traceback.format_exception(exception))
            progress = fail_operation(
                session, operation_id, message.actor_name, describe_error(exception), error_traceback, marked=marked
            )
            return stage(session, operation_id, progress.outgoing, release_throttle=progress.ended)

    def _stage(self, operation_id: str, progress: Progress) -> None:
        with self.sessions() as session:
            stage(session, operation_id, progress.outgoing, release_throttle=progress.ended)

    def _send(self, broker: dramatiq.Broker, operation_id: str, progress: Progress) -> None:
        enqueue_all(broker, progress.outgoing)
        if progress.ended:
            self._end(broker, operation_id)
            return
        inflight = find_inflight(broker)
        if inflight is not None:
            inflight.mark_sent(operation_id, [item.message.message_id for item in progress.outgoing])

    def _end(self, broker: dramatiq.Broker, operation_id: str) -> None:
        """The operation has just ended well: drop its marks and release its slot, in one round trip when
        they share a server."""
        throttle = self.throttle or find_throttle(broker)
        keys = _keys_to_forget(broker, operation_id, self.marks)
        if (
            throttle is not None
            and throttle.enabled
            and keys is not None
            and throttle.store.client is self.marks.client
        ):
            throttle.release(broker, operation_id, delete_keys=keys)
            return
        forget_marks(broker, operation_id, self.marks)
        self._release(broker, operation_id)

    def _release(self, broker: dramatiq.Broker, operation_id: str) -> None:
        throttle = self.throttle or find_throttle(broker)
        if throttle is not None:
            throttle.release(broker, operation_id)  # idempotent

    def _finish_what_a_crash_left(self, broker: dramatiq.Broker, message: Message[Any], check: StepCheck) -> None:
        """A completed step, or a step of an operation that succeeded, delivered again: send what followed it
        and has neither completed nor been sent, and free the slot of an operation that succeeded."""
        operation_id = message.options[OPTION_OPERATION]
        if check.ended:
            # Its acknowledgement leaves this copy's in-flight name (see InFlight.after_ack): drop the ended
            # operation's names now, as its end did.
            forget_marks(broker, operation_id, self.marks)
        if check.succeeded and message.options.get(OPTION_THROTTLE):
            self._release(broker, operation_id)
        if not check.follow_up:
            return
        inflight = find_inflight(broker)
        sent = inflight.sent(operation_id) if inflight is not None else set()
        missing = [item for item in check.follow_up if item.message.message_id not in sent]
        if missing:
            logger.warning(
                "operation %s: step %s was recorded but what follows it was not sent (a worker stopped in "
                "between); sending %d message(s) now",
                operation_id,
                message.options[OPTION_NODE],
                len(missing),
            )
            enqueue_all(broker, missing)
