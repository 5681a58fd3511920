"""Every log line written while a worker thread processes a message names the message's operation,
resource, throttle scopes, actor and id (see ``resources.logs`` for the filter and the formats).

Put it first in the middleware list: its before-hook then runs before every other middleware's, and its
after-hooks (run in reverse order) after theirs, so their log lines carry the fields too.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware

from resources.logs import LogFields, set_log_fields

from .plan import OPTION_OPERATION, OPTION_RESOURCE, OPTION_THROTTLE

__all__ = ["LogContext", "log_fields_of"]


def log_fields_of(message: Message[Any]) -> LogFields:
    options = message.options
    return LogFields(
        operation_id=str(options.get(OPTION_OPERATION) or ""),
        resource_ref=str(options.get(OPTION_RESOURCE) or ""),
        throttle_scope=_scope_keys(options.get(OPTION_THROTTLE)),
        actor_name=message.actor_name,
        message_id=message.message_id,
    )


def _scope_keys(throttle: Any) -> str:
    # Read leniently: a malformed option is for the throttle to refuse, not a reason to lose the log fields.
    try:
        return ",".join(str(key) for key, _limit in throttle or ())
    except (TypeError, ValueError):
        return ""


class LogContext(Middleware):
    """Sets the thread's log fields for the duration of each message, and clears them after it."""

    def before_process_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        # Replaces whatever the thread had: nothing of an earlier message can survive into this one.
        set_log_fields(log_fields_of(message))

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Message[Any],
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        set_log_fields(None)

    def after_skip_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        set_log_fields(None)
