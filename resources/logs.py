"""Log lines that say which step wrote them, as text or as JSON (``JOBS_LOG_FORMAT``), from the level
``JOBS_LOG_LEVEL`` sets.

While a worker thread processes a message, ``middleware.log_context`` keeps the message's operation,
resource, throttle scopes, actor and id in a ContextVar here. A filter on the root logger's handlers copies
them onto every record, whichever library logged it; outside a message they are empty strings.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from .config import log_format_from_env, log_level_from_env

__all__ = [
    "CONTEXT_FIELDS",
    "DEFAULT_TEXT_FORMAT",
    "ContextJsonFormatter",
    "ContextTextFormatter",
    "LogContextFilter",
    "LogFields",
    "add_log_fields",
    "configure_logging",
    "current_log_fields",
    "install_log_format",
    "set_log_fields",
]

#: The command lines' text format (the dramatiq CLI's own format is kept in worker processes).
DEFAULT_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class LogFields:
    """What identifies the message a thread is processing; "" where it has none."""

    operation_id: str = ""
    resource_ref: str = ""
    #: The operation's throttle scope keys, comma-separated (keys cannot contain commas).
    throttle_scope: str = ""
    actor_name: str = ""
    message_id: str = ""


#: The LogRecord attributes the filter sets.
CONTEXT_FIELDS = tuple(f.name for f in fields(LogFields))
#: How the text format labels each field.
_LABELS = {
    "operation_id": "op",
    "resource_ref": "ref",
    "throttle_scope": "scope",
    "actor_name": "actor",
    "message_id": "msg",
}
_EMPTY = LogFields()
# A ContextVar, not a thread-local attribute: each worker thread has a context of its own, and code that
# copies contexts (asyncio, context.run) carries the fields along.
_CURRENT: contextvars.ContextVar[LogFields] = contextvars.ContextVar("log_fields", default=_EMPTY)


def current_log_fields() -> LogFields:
    return _CURRENT.get()


def set_log_fields(log_fields: LogFields | None) -> None:
    """Set (None: clear) this thread's fields; middleware enter and leave a message in two separate hooks."""
    _CURRENT.set(log_fields or _EMPTY)


def add_log_fields(record: logging.LogRecord) -> None:
    """Copy the current fields onto ``record``, keeping any a caller passed in ``extra``."""
    current = _CURRENT.get()
    for name in CONTEXT_FIELDS:
        if name not in record.__dict__:
            setattr(record, name, getattr(current, name))
    if "log_context" not in record.__dict__:
        shown = [f"{_LABELS[name]}={value}" for name in CONTEXT_FIELDS if (value := record.__dict__[name])]
        record.log_context = f"[{' '.join(shown)}] " if shown else ""


class LogContextFilter(logging.Filter):
    """Adds the context fields to every record a handler handles. On the handler, not on loggers: a
    logger's filters do not see records propagated from other loggers (Dramatiq's, SQLAlchemy's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        add_log_fields(record)
        return True


class ContextTextFormatter(logging.Formatter):
    """``fmt`` with ``[op=… ref=… scope=… actor=… msg=…]`` before the message, when there is a context."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        fmt = fmt or DEFAULT_TEXT_FORMAT
        if "%(log_context)s" not in fmt:
            fmt = (
                fmt.replace("%(message)s", "%(log_context)s%(message)s", 1)
                if "%(message)s" in fmt
                else f"{fmt} %(log_context)s"
            )
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        add_log_fields(record)  # for handlers that have no filter (records that did not reach the root)
        return super().format(record)


class ContextJsonFormatter(JsonFormatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, process, thread, the context
    fields (null when empty), anything passed in ``extra``, and exc_info/stack_info as strings."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s %(process)s %(threadName)s "
            + " ".join(f"%({name})s" for name in CONTEXT_FIELDS),
            rename_fields={"levelname": "level", "name": "logger", "threadName": "thread"},
            reserved_attrs=[*RESERVED_ATTRS, "log_context", "taskName"],
        )

    def format(self, record: logging.LogRecord) -> str:
        add_log_fields(record)
        return super().format(record)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        # First, so that a person reading the raw lines sees it first too.
        log_data["time"] = (
            datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        super().add_fields(log_data, record, message_dict)
        for name in CONTEXT_FIELDS:
            log_data[name] = log_data.get(name) or None


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes, like logging's last resort: a stream
    captured at set-up (a test runner's, a CLI runner's) may be closed by the next record."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr


def _formatter_for(current: logging.Formatter | None, log_format: str) -> logging.Formatter | None:
    """The formatter a root handler should get, or None to leave it the one it has."""
    ours = isinstance(current, ContextTextFormatter | ContextJsonFormatter)
    if current is not None and not ours and type(current) is not logging.Formatter:
        return None  # a formatter class chosen on purpose (a test runner's, an application's)
    if log_format == "json":
        return None if isinstance(current, ContextJsonFormatter) else ContextJsonFormatter()
    if isinstance(current, ContextTextFormatter):
        return None
    if type(current) is logging.Formatter:
        if type(current._style) is not logging.PercentStyle:
            return None  # a {}- or $-style format: cannot add the context field to it
        # Keep the format the handler was given (the dramatiq CLI's, with PID and thread), plus the context.
        return ContextTextFormatter(current._fmt, current.datefmt)
    return ContextTextFormatter()


def install_log_format(log_format: str | None = None) -> None:
    """Give every root handler the context filter and the ``JOBS_LOG_FORMAT`` formatter, and the root logger the
    ``JOBS_LOG_LEVEL`` level when it is set; idempotent.

    Handlers with the standard formatter (``logging.basicConfig``'s, the dramatiq CLI's) or ours are
    re-formatted; a handler whose formatter is of another class only gets the filter. Adds no handler:
    modules that worker processes import call this, and a process that set up no logging keeps none.
    """
    _install(log_format or log_format_from_env(), log_level_from_env())


def _install(log_format: str, level: str | None) -> None:
    """``install_log_format`` with both variables already read."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, LogContextFilter) for f in handler.filters):
            handler.addFilter(LogContextFilter())
        formatter = _formatter_for(handler.formatter, log_format)
        if formatter is not None:
            handler.setFormatter(formatter)
    if level is not None:
        # The dramatiq CLI logs from INFO (DEBUG with -v), and Dramatiq has no setting for it: on a busy worker
        # the line each operation's end writes is a cost, and a log drain's bill.
        logging.getLogger().setLevel(level.upper())


def configure_logging(default_level: int | None = None, *, level: int | None = None) -> None:
    """For command lines: a stderr handler on the root logger unless it has one, then :func:`install_log_format`.
    The root logger's level is ``level`` if given (a command's ``--verbose``), else ``JOBS_LOG_LEVEL`` if set,
    else ``default_level`` if given. Idempotent; raises ConfigurationError for a bad ``JOBS_LOG_FORMAT`` or
    ``JOBS_LOG_LEVEL`` before changing anything."""
    log_format = log_format_from_env()
    from_env = log_level_from_env()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_StderrHandler())
    _install(log_format, from_env)
    if level is not None:
        root.setLevel(level)
    elif from_env is None and default_level is not None:
        root.setLevel(default_level)
