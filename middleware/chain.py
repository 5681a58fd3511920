"""Step chaining: a worker that finishes a step runs the operation's next step itself, instead of sending
it through the broker for some worker to fetch.

A sequence of five steps otherwise costs five broker round trips and five checks before a step, most of
an operation's cost when the steps are short. A chained step is run only when it is the one step its
predecessor's completion starts, goes to the same queue, has no delay, and the chain is still within its
time budget (``JOBS_STEP_CHAIN_S``); anything else is sent as before.

Each chained step's completion is recorded before the next step starts, as a mark in Redis (``step_marks``)
rather than a write transaction: the mark is refused once the operation is being ended (a cancel, a failed
sibling), so it is also the next step's check, and a chained step needs no read before it. The database gets
the marked steps in the transaction that records the chain's last step. Recording the chain's steps only at
its end would save the marks too, but a crash would then run again steps whose successors had already acted
(delete a volume, then try to delete it again), which no step can be expected to survive.

The message that started the chain stays unacknowledged until the chain ends, so a worker killed in the
middle has it delivered again, and its check sends the first step not recorded (``progress.check_step``
follows recorded steps to it): as without chaining, a crash runs again at most the step it interrupted.
Every chained step goes through every middleware hook (time limit, retries, logs, metrics) as a delivered
message would. The throttle is not asked again for a step outside any group: the operation keeps the slot
its first step was admitted with, held for the unacknowledged message (the slot of an operation whose next
step is queued does not expire), and a cancel that releases it stops the chain at the next mark.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from datetime import datetime
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.middleware import SkipMessage

from .message_proxy import FieldsProxy
from .plan import OPTION_NODE, ancestors, node_at
from .progress import Progress

__all__ = ["StepChain", "process_here"]

logger = logging.getLogger(__name__)


def process_here(broker: dramatiq.Broker, message: MessageProxy) -> None:
    """Run ``message`` in this thread as a Dramatiq worker thread runs a delivered one: every middleware
    hook before and after, the outcome (result, error, skip) handed to the after-hooks. Nothing is
    acknowledged: the message never was in the broker.

    It runs in a copy of the caller's context: what its hooks set in ContextVars (log fields, the current
    message, the step context) ends with it, and the after-hooks of the delivered message that started the
    chain, which run once the chain ends, still see that message's own."""
    contextvars.copy_context().run(_process, broker, message)


def _process(broker: dramatiq.Broker, message: MessageProxy) -> None:
    try:
        broker.emit_before("process_message", message)
        result = None
        if not message.failed:
            result = broker.get_actor(message.actor_name)(*message.args, **message.kwargs)
        broker.emit_after("process_message", message, result=result)
    except SkipMessage:
        broker.emit_after("skip_message", message)
    except BaseException as error:
        message.stuff_exception(error)
        if not isinstance(error, dramatiq.Retry):
            logger.error("Failed to process message %s with unhandled exception.", message, exc_info=True)
        broker.emit_after("process_message", message, exception=error)
    finally:
        message.clear_exception()


class _ChainState(threading.local):
    running: bool = False
    started: float = 0.0
    #: The chained message being run now.
    current_id: str | None = None
    #: Set by a chained step's completion: the step to run after it.
    following: Message[Any] | None = None
    #: The throttle grant of the step that started the chain (None: not throttled).
    fence: int | None = None
    #: The operation's plan, from the last record.
    plan: dict | None = None
    #: The operation's marks: those the chain's first step was checked with, and the chain's own.
    marked: dict[str, datetime] | None = None


class StepChain:
    """Per worker thread: whether a completed step's successor runs here, and the loop that runs it."""

    def __init__(self, budget_s: float) -> None:
        #: How long one chain may run steps here (seconds); 0 sends every step through the broker.
        self.budget_s = budget_s
        #: Set when the worker begins to shut down: running chains send their next step instead of running
        #: it, so that a stop waits for the steps under way only.
        self.stopping = threading.Event()
        self._state = _ChainState()

    def is_chained(self, message: Message[Any]) -> bool:
        """Is ``message`` the chained step this thread is running (not a delivered one)?"""
        state = self._state
        return state.running and state.current_id == message.message_id

    def successor(self, broker: dramatiq.Broker, message: Message[Any], progress: Progress) -> Message[Any] | None:
        """The step to run here after ``message`` completed with ``progress``, or None to send it."""
        if self.budget_s <= 0 or self.stopping.is_set() or progress.ended or len(progress.outgoing) != 1:
            return None
        state = self._state
        if state.running and time.monotonic() - state.started >= self.budget_s:
            return None
        following = progress.outgoing[0]
        if following.delay:  # the plan's delay of the step, or a countdown: the broker keeps it meanwhile
            return None
        if q_name(following.message.queue_name) != q_name(message.queue_name):
            return None  # another queue: its own workers (heavy ones, say) must run it
        if following.message.actor_name not in broker.actors:
            return None
        return following.message

    @property
    def plan(self) -> dict | None:
        """The plan of the operation this thread's chain runs, from its last record."""
        return self._state.plan

    @property
    def marked(self) -> dict[str, datetime] | None:
        """The marks of the operation this thread's chain runs: those its first step's check read and those the
        chain made since (see ``OperationTransitions._marks_known``)."""
        return self._state.marked

    @property
    def fence(self) -> int | None:
        """The throttle grant of the step that started this thread's chain (None: not throttled)."""
        return self._state.fence

    def keeps_slot(self, message: Message[Any]) -> bool:
        """May chained step ``message`` run under the grant of the step that started the chain, without
        asking the throttle? Yes when no other step of its operation can be running beside it (it is inside
        no group); otherwise a worker running a sibling may be killed and the lease reaped meanwhile."""
        plan = self._state.plan
        if plan is None:
            return False
        return all(node_at(plan["root"], path)["kind"] != "par" for path in ancestors(message.options[OPTION_NODE]))

    def run(
        self,
        broker: dramatiq.Broker,
        first: Message[Any],
        progress: Progress,
        *,
        fence: int | None,
        marked: dict[str, datetime] | None = None,
    ) -> None:
        """Run ``first`` here (``progress``, the record of the step before it, has the plan; ``marked``, the
        operation's marks with that record's), then each step that a chained step's completion passes back.
        Called from inside a chain, only notes the step: the running loop takes it next."""
        state = self._state
        state.plan, state.marked = progress.plan, marked
        if state.running:
            state.following = first
            return
        state.running, state.started, state.fence = True, time.monotonic(), fence
        following: Message[Any] | None = first
        try:
            while following is not None:
                state.following, state.current_id = None, following.message_id
                process_here(broker, FieldsProxy(following))
                following = state.following
        finally:
            state.running, state.current_id, state.following = False, None, None
            state.plan = state.marked = None
