"""Operation transitions: move an operation along its plan as its steps succeed, and fail it once when
a step fails for good; gate every step through the throttle.

Must sit *before* Retries in the middleware list: ``after_*`` hooks run in reverse order, so ours then
runs after Retries has decided, and ``message.failed`` tells a final failure from an attempt that will
be retried (Dramatiq has no "failed for good" hook; Callbacks' ``on_failure`` fires on every attempt).
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware, SkipMessage
from sqlalchemy.orm import Session

from resources.db import read_scope, session_scope

from .context import StepContext, set_step_context
from .plan import OPTION_CALLBACK, OPTION_NODE, OPTION_OPERATION
from .progress import Progress, check_step, complete_step, enqueue_all, fail_operation
from .sent import SentMarks
from .throttle import Throttle, find_throttle

__all__ = ["OperationTransitions", "conclude", "describe_error", "enqueue_all"]

logger = logging.getLogger(__name__)


def describe_error(exception: BaseException) -> str:
    text = str(exception)
    return text if text else type(exception).__name__


def conclude(broker: dramatiq.Broker, operation_id: str, progress: Progress) -> None:
    """After an operation's end (a cancel, a janitor) is committed: free its throttle slot or its place
    in line, and send its failure callbacks."""
    throttle = find_throttle(broker)
    if progress.ended and throttle is not None:
        throttle.release(broker, operation_id)
    enqueue_all(broker, progress.outgoing)


class OperationTransitions(Middleware):
    """Runs each operation's plan: next steps on success, failure callbacks once on final failure,
    no step of an operation that has already ended, and no step of a throttled operation without its
    slot."""

    def __init__(
        self,
        sessions: Callable[[], AbstractContextManager[Session]] = session_scope,
        throttle: Throttle | None = None,
        sent: SentMarks | None = None,
        read_sessions: Callable[[], AbstractContextManager[Session]] = read_scope,
    ) -> None:
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.throttle = throttle
        self.sent = sent or SentMarks()

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
        with self.read_sessions() as session:
            check = check_step(session, operation_id, path, lambda: self.sent.is_marked(operation_id, path))
        if check.ended and self.throttle is not None:
            self.throttle.release(broker, operation_id)  # a no-op, unless a crash skipped the release
        enqueue_all(broker, check.redrive)
        if check.skip is not None:
            logger.info("skipping %s: %s", message, check.skip)
            raise SkipMessage(check.skip)
        if self.throttle is not None:
            fence = self.throttle.before_step(broker, message)
            set_step_context(dataclasses.replace(context, throttle_fence=fence))

    def after_skip_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        set_step_context(None)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Message[Any],
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
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
        if exception is None:
            with self.sessions() as session:
                progress = complete_step(session, operation_id, path)
        elif message.failed:
            error_traceback = "".join(traceback.format_exception(exception))
            with self.sessions() as session:
                progress = fail_operation(
                    session, operation_id, message.actor_name, describe_error(exception), error_traceback
                )
        else:
            progress = Progress([])  # Retries will deliver it again; not a failure yet.
        if progress.ended and self.throttle is not None:
            self.throttle.release(broker, operation_id)
        enqueue_all(broker, progress.outgoing)
        if exception is None and progress.outgoing:
            self.sent.mark(operation_id, path)
