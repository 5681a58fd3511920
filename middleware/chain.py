"""Step chaining: a worker that finishes a step runs the operation's next step itself, instead of sending
it through the broker for some worker to fetch.

A sequence of five steps otherwise costs five broker round trips and five checks before a step, most of
an operation's cost when the steps are short. A chained step is run only when it is the one step its
predecessor's completion starts, goes to the same queue, has no delay, and the chain is still within its
time budget (``JOBS_STEP_CHAIN_S``); anything else is sent as before.

The message that started the chain stays unacknowledged until the chain ends, so a worker killed in the
middle has it delivered again, and the redelivery sends the first step the chain had not recorded
(``progress.check_step`` follows recorded steps to it). The chain's completions are recorded together
when it stops, in one transaction: a crash runs the unrecorded steps again, as a crash during a step
always has (steps are at-least-once). Before each chained step the operation is still checked (a cancel
stops the chain there), and every chained step goes through every middleware hook (time limit, throttle,
retries, logs, metrics) as a delivered message would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.middleware import SkipMessage

from .plan import OPTION_OPERATION, advance
from .progress import Progress, outgoing_of

__all__ = ["StepChain", "process_here"]

logger = logging.getLogger(__name__)


def process_here(broker: dramatiq.Broker, message: MessageProxy) -> None:
    """Run ``message`` in this thread as a Dramatiq worker thread runs a delivered one: every middleware
    hook before and after, the outcome (result, error, skip) handed to the after-hooks. Nothing is
    acknowledged: the message never was in the broker."""
    actor = None
    try:
        broker.emit_before("process_message", message)
        result = None
        if not message.failed:
            actor = broker.get_actor(message.actor_name)
            result = actor(*message.args, **message.kwargs)
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
    operation_id: str = ""
    plan: dict | None = None
    #: The operation's nodes done as this chain knows them: recorded ones, and those of ``pending``.
    done: set[str]
    #: Chained steps that completed and are not recorded yet, in the order they ran.
    pending: list[str]


Record = Callable[[str, list[str]], object]


class StepChain:
    """Per worker thread: whether a completed step's successor runs here, and the loop that runs it.

    A chained step's completion is not recorded at once: the chain goes on while each completion starts
    exactly one step it may run, and the completions are recorded together, in one transaction, when it
    stops (by whoever ends it: the last step's completion or failure, or ``record`` when a step is retried
    or skipped). Until then the message that started the chain is unacknowledged, so a worker killed in the
    middle has the chain run again from the first step not recorded."""

    def __init__(self, budget_s: float) -> None:
        #: How long one chain may run steps here (seconds); 0 sends every step through the broker.
        self.budget_s = budget_s
        self._state = _ChainState()

    def is_chained(self, message: Message[Any]) -> bool:
        """Is ``message`` the chained step this thread is running (not a delivered one)?"""
        state = self._state
        return state.running and state.current_id == message.message_id

    def successor(self, broker: dramatiq.Broker, message: Message[Any], progress: Progress) -> Message[Any] | None:
        """The step to run here after ``message`` completed with ``progress``, or None to send it."""
        if self.budget_s <= 0 or progress.ended or len(progress.outgoing) != 1:
            return None
        state = self._state
        if state.running and time.monotonic() - state.started >= self.budget_s:
            return None
        following = progress.outgoing[0]
        if following.delay or following.message.options.get("delay"):
            return None
        if q_name(following.message.queue_name) != q_name(message.queue_name):
            return None  # another queue: its own workers (heavy ones, say) must run it
        if following.message.actor_name not in broker.actors:
            return None
        return following.message

    def defer(self, broker: dramatiq.Broker, message: Message[Any], path: str) -> Message[Any] | None:
        """Chained step ``path`` completed: note it, and return the step to run next here, if there is one
        (else the caller records ``take_pending()`` and sends what follows as usual). The chain's view of
        what is done may be behind (another branch of a group finishing elsewhere): it only ever chooses
        the next step of a sequence, and the record decides everything else."""
        state = self._state
        assert state.plan is not None
        state.pending.append(path)
        step = advance(state.plan["root"], state.done, path)
        state.done.update(step.completed)
        return self.successor(broker, message, Progress(outgoing_of(state.plan, step.start), ended=step.finished))

    def take_pending(self) -> list[str]:
        """The chain's unrecorded completions, now the caller's to record."""
        pending, self._state.pending = self._state.pending, []
        return pending

    def run(self, broker: dramatiq.Broker, first: Message[Any], progress: Progress, record: Record) -> None:
        """Run ``first`` here (its predecessor's recorded ``progress`` has the plan), then each step that a
        chained step's completion passes back. Called from inside a chain, only notes the step: the
        running loop takes it next. ``record(operation_id, paths)`` records completions left pending
        when the chain stops at a step that did not complete (retried, skipped, or interrupted)."""
        state = self._state
        if state.running:
            state.following = first
            if progress.plan is not None:  # recorded just now: the database's view, fresher than the chain's
                state.plan, state.done = progress.plan, set(progress.done)
            return
        operation_id = first.options[OPTION_OPERATION]
        state.running, state.started, state.operation_id = True, time.monotonic(), operation_id
        state.plan, state.done, state.pending = progress.plan, set(progress.done), []
        following: Message[Any] | None = first
        try:
            while following is not None:
                state.following, state.current_id = None, following.message_id
                process_here(broker, MessageProxy(following))
                following = state.following
        finally:
            pending = self.take_pending()
            state.running, state.current_id, state.following, state.plan = False, None, None, None
            if pending:
                record(operation_id, pending)
