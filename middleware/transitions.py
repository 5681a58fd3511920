"""Operation transitions: move an operation along its plan as its steps succeed, and fail it once when
a step fails for good.

Must sit *before* Retries in the middleware list: ``after_*`` hooks run in reverse order, so ours then
runs after Retries has decided, and ``message.failed`` tells a final failure from an attempt that will
be retried (Dramatiq has no "failed for good" hook; Callbacks' ``on_failure`` fires on every attempt).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware, SkipMessage
from sqlalchemy.orm import Session

from resources.db import session_scope

from .context import StepContext, set_step_context
from .plan import OPTION_CALLBACK, OPTION_NODE, OPTION_OPERATION
from .progress import Outgoing, complete_step, fail_operation, skip_reason

__all__ = ["OperationTransitions", "describe_error", "enqueue_all"]

logger = logging.getLogger(__name__)


def describe_error(exception: BaseException) -> str:
    text = str(exception)
    return text if text else type(exception).__name__


def enqueue_all(broker: dramatiq.Broker, outgoing: Iterable[Outgoing]) -> None:
    for item in outgoing:
        broker.enqueue(item.message, delay=item.delay)


class OperationTransitions(Middleware):
    """Runs each operation's plan: next steps on success, failure callbacks once on final failure,
    and no step of an operation that has already ended."""

    def __init__(self, sessions: Callable[[], AbstractContextManager[Session]] = session_scope) -> None:
        self.sessions = sessions

    @staticmethod
    def _is_step(message: Message[Any]) -> bool:
        options = message.options
        return OPTION_OPERATION in options and OPTION_NODE in options and OPTION_CALLBACK not in options

    def before_process_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        set_step_context(StepContext.from_options(message.options))
        if not self._is_step(message):
            return
        with self.sessions() as session:
            reason = skip_reason(session, message.options[OPTION_OPERATION], message.options[OPTION_NODE])
        if reason is not None:
            logger.info("skipping %s: %s", message, reason)
            raise SkipMessage(reason)

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
        operation_id = message.options[OPTION_OPERATION]
        if exception is None:
            with self.sessions() as session:
                outgoing = complete_step(session, operation_id, message.options[OPTION_NODE])
        elif message.failed:
            error_traceback = "".join(traceback.format_exception(exception))
            with self.sessions() as session:
                outgoing = fail_operation(
                    session, operation_id, message.actor_name, describe_error(exception), error_traceback
                )
        else:
            return  # Retries will deliver it again; not a failure yet.
        enqueue_all(broker, outgoing)
