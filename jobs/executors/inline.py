"""Sync mode: run an operation's plan in this process with the same semantics as the workers.

The same progress functions decide what runs next and what happens on failure; only the transport
differs (a local queue instead of the broker). Group members run one after another. A retried step
waits its delay here, as a worker's retry would.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq import Message, Retry
from dramatiq.middleware.retries import DEFAULT_MIN_BACKOFF

from middleware import Outgoing, StepContext, complete_step, fail_operation, step_context
from middleware.plan import OPTION_NODE
from middleware.transitions import describe_error
from resources.db import session_scope

__all__ = ["run_inline"]

logger = logging.getLogger(__name__)


def run_inline(broker: dramatiq.Broker, operation_id: str, outgoing: Iterable[Outgoing]) -> None:
    pending = deque(outgoing)
    while pending:
        message = pending.popleft().message
        error = _run_with_retries(broker, message)
        if error is None:
            with session_scope() as session:
                pending.extend(complete_step(session, operation_id, message.options[OPTION_NODE]).outgoing)
            continue
        error_traceback = "".join(traceback.format_exception(error))
        with session_scope() as session:
            callbacks = fail_operation(
                session, operation_id, message.actor_name, describe_error(error), error_traceback
            ).outgoing
        for callback in callbacks:
            callback_error = _run_with_retries(broker, callback.message)
            if callback_error is not None:
                logger.error(
                    "failure callback %s of operation %s failed: %s",
                    callback.message,
                    operation_id,
                    describe_error(callback_error),
                )
        raise error


def _run_with_retries(broker: dramatiq.Broker, message: Message[Any]) -> Exception | None:
    actor = broker.get_actor(message.actor_name)
    max_retries = message.options.get("max_retries", actor.options.get("max_retries", 0))
    retry_when = actor.options.get("retry_when")
    attempt = 0
    while True:
        options = {**message.options, "retries": attempt}
        try:
            with step_context(StepContext.from_options(options)):
                actor.fn(*message.args, **message.kwargs)
            return None
        except Exception as error:
            retry = retry_when(attempt, error) if retry_when else max_retries is None or attempt < max_retries
            if not retry:
                return error
            delay_ms = error.delay if isinstance(error, Retry) and error.delay else DEFAULT_MIN_BACKOFF
            time.sleep(delay_ms / 1000)
            attempt += 1
