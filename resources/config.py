"""Configuration, read from the environment in this one place (twelve-factor).

A PaaS sets ``REDIS_URL`` and ``DATABASE_URL``; everything else has a sane default and an
environment override. Call :func:`get_settings` at use time, not at import time, so that a CLI
which starts an embedded Redis can set ``REDIS_URL`` before anything reads it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from redis.connection import parse_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError
from .states import TRANSITIONAL_STATES, State
from .urls import redact_text, redact_url

__all__ = [
    "Settings",
    "check_broker_url",
    "check_database_url",
    "check_redis_url",
    "get_settings",
    "normalise_database_url",
]

#: Where the default SQLite database lives when DATABASE_URL is unset.
DEFAULT_DATA_DIR = ".jobs-data"
T = TypeVar("T", int, float)
#: Values of JOBS_LOG_FORMAT: lines for people, or one JSON object a line for log shippers.
LOG_FORMATS = ("text", "json")
#: Values of JOBS_LOG_LEVEL, the least severe level a process writes (unset: the command's own default).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

#: How long a resource may sit in a transitional state, counted from when its operation started,
#: before the janitor moves it to ERRED -- and only once nothing is queued, running or parked for that
#: operation. Waldur gives provisioning 3 hours; its other states are never rescued at all.
DEFAULT_STUCK_AFTER_S: dict[State, float] = {
    State.CREATION_SCHEDULED: 3600.0,
    State.CREATING: 3 * 3600.0,
    State.UPDATE_SCHEDULED: 3600.0,
    State.UPDATING: 3600.0,
    State.DELETION_SCHEDULED: 3600.0,
    State.DELETING: 3600.0,
}


@dataclass(frozen=True)
class Settings:
    #: Broker URL; None means "not configured" (the CLI and tests then start an embedded Redis).
    redis_url: str | None
    database_url: str
    data_dir: Path
    #: Prefix of every Redis key this project writes (broker queues included).
    namespace: str
    #: Fixed delay between two attempts of a poll step, seconds (Waldur: 5 s).
    poll_interval_s: float
    #: Attempts of a runtime-state poll (Waldur: 1200) and of a backend-check poll (Waldur: 600).
    poll_state_attempts: int
    poll_check_attempts: int
    #: Wall-clock limit of one step attempt, seconds (Dramatiq's default is 10 minutes).
    step_time_limit_s: float
    #: Limit of one poll attempt, seconds: one poll only asks the backend once.
    poll_time_limit_s: float
    #: The per-scope throttle ("off" turns it off everywhere, e.g. to measure its overhead).
    throttle_enabled: bool
    #: Concurrent operations per throttle scope when neither the executor nor the scope's service
    #: settings say otherwise (Waldur's default: 4).
    throttle_default_limit: int
    #: Lease of an operation whose step is running, renewed by the worker's heartbeat; a killed
    #: worker's slot is reclaimed this long after its last renewal.
    throttle_lease_s: float
    #: How often each worker renews its leases and reaps expired ones.
    throttle_heartbeat_s: float
    #: How long a slot handed to a waiting operation stays reserved for its first step before the
    #: hand-off is sent again (covers a crash between the hand-off and sending its message).
    throttle_handoff_timeout_s: float
    #: RedisBroker: a worker silent this long is dead and its unacknowledged messages are put back
    #: (Dramatiq's default: 60 s). An idle consumer polls at least every second and every worker runs
    #: a maintenance thread, so a live worker is never silent this long ...
    broker_heartbeat_timeout_ms: int
    #: ... checked on this many Redis calls out of a million (Dramatiq's default: 1000) ...
    broker_maintenance_chance: int
    #: ... and, so that the bound does not depend on luck, by every worker this often (seconds): a
    #: killed worker's messages are back in their queue within heartbeat timeout + this interval.
    broker_maintenance_interval_s: float = 5.0
    #: Transactional outbox: a worker's relay sends rows a committing process left unsent (killed
    #: after its commit, Redis down) once they are this old (seconds) ...
    outbox_grace_s: float = 5.0
    #: ... looking every this many seconds: an operation's messages are sent within about
    #: grace + interval of its commit, as soon as Redis and one worker are up.
    outbox_relay_interval_s: float = 5.0
    #: Step chaining: a worker that finishes a step runs the operation's next step itself (when it is the
    #: only one to start, on the same queue, without delay) for up to this many seconds in a row, instead
    #: of sending it through the broker; JOBS_STEP_CHAIN=off (0 here) sends every step through the broker.
    step_chain_s: float = 30.0
    #: Ended operations whose end is older than this many days are deleted, with their step records, by the
    #: periodic retention job; JOBS_OPERATION_RETENTION=off (0 here) keeps them forever.
    operation_retention_days: float = 30.0
    #: Attempts of a step that hit a transient infrastructure error (database or Redis unreachable)
    #: before it fails for good; each waits twice as long as the one before, from 1 s up to 60 s.
    transient_retries: int = 10
    #: The largest encoded message a producer may send (bytes): big data belongs in the database,
    #: referenced from the message.
    max_message_bytes: int = 256 * 1024
    #: The zone cron schedules are read in (an IANA name such as "Europe/Berlin"); UTC by default,
    #: so that "0 3 * * *" means the same hour on every machine.
    scheduler_timezone: str = "UTC"
    #: The scheduler leader's lease in Redis: a dead leader is replaced this long after its last renewal.
    scheduler_lease_s: float = 15.0
    #: How long the de-duplication guard of a queued background job lives without a worker taking
    #: it (covers a message lost from the broker); a job waiting in a longer backlog can be enqueued again.
    dedup_queued_ttl_s: float = 86400.0
    #: Lease of the guard of a running background job, renewed by its worker; a guard left by a
    #: killed worker expires this long after the last renewal.
    dedup_lease_s: float = 30.0
    #: Per transitional state, see DEFAULT_STUCK_AFTER_S; JOBS_STUCK_<STATE>_S overrides one.
    stuck_after_s: dict[State, float] = field(default_factory=lambda: dict(DEFAULT_STUCK_AFTER_S))
    #: How every process writes its log lines, one of LOG_FORMATS (see resources.logs).
    log_format: str = "text"
    #: The least severe level every process writes, one of LOG_LEVELS; None leaves each command's own.
    log_level: str | None = None
    #: BROKER_URL: an amqp:// URL makes RabbitMQ the message broker; None keeps the Redis broker. The
    #: throttle, locks, de-duplication and the scheduler's lease stay in Redis either way.
    amqp_url: str | None = None

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.scheduler_timezone)

    @property
    def broker_url(self) -> str:
        """The Redis URL processes connect to: REDIS_URL, else Redis's conventional local address."""
        return self.redis_url or "redis://127.0.0.1:6379/0"

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks; the URLs' passwords must not.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("redis_url", "database_url", "amqp_url"):
            if shown[name] is not None:
                shown[name] = redact_url(shown[name])
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"


def _env_number(name: str, default: T, kind: Callable[[str], T]) -> T:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    wanted = "a positive integer" if kind is int else "a positive number"
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number; set it to {wanted}") from None
    if value <= 0:
        raise ConfigurationError(f"{name}={raw!r} must be positive; set it to {wanted}")
    return value


def _env_switch(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a switch; set it to on or off")


def _env_zone(name: str, default: str) -> str:
    raw = os.environ.get(name) or default
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"{name}={raw!r} is not a time zone; set it to an IANA name such as UTC or Europe/Berlin"
        ) from None
    return raw


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigurationError(f"{name}={raw!r} is not one of {', '.join(choices)}; set it to {' or '.join(choices)}")
    return value


def log_format_from_env() -> str:
    """JOBS_LOG_FORMAT, checked. Logging is set up before anything needs the other settings (whose errors
    should be logged, not raised by the set-up), so it reads this one alone."""
    return _env_choice("JOBS_LOG_FORMAT", "text", LOG_FORMATS)


def log_level_from_env() -> str | None:
    """JOBS_LOG_LEVEL, checked (lower case), or None when unset; read alone, as JOBS_LOG_FORMAT is."""
    level = _env_choice("JOBS_LOG_LEVEL", "", LOG_LEVELS)
    return level or None


def normalise_database_url(url: str) -> str:
    """PaaS providers hand out ``postgres://`` URLs; SQLAlchemy wants a dialect+driver name."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


#: The forms REDIS_URL may take, for error messages.
REDIS_URL_FORMS = "redis://[user:password@]host:port/db, rediss:// for TLS, or unix:///path/to/socket"
#: The forms BROKER_URL may take, for error messages.
BROKER_URL_FORMS = "amqp://user:password@host:5672/vhost, or amqps:// for TLS"
#: The forms DATABASE_URL may take, for error messages.
DATABASE_URL_FORMS = "postgresql://user:password@host:port/dbname or sqlite:///path/to/file.sqlite3"


def _port_is_number(url: str) -> bool:
    try:
        _ = urlsplit(url).port  # reading it is what checks it
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=32)  # get_settings() runs on every session; a URL is checked once
def check_redis_url(url: str) -> None:
    """Raise ConfigurationError unless redis-py can connect with ``url`` (scheme redis, rediss or unix)."""
    shown = f"REDIS_URL={redact_url(url)!r}"
    scheme = url.partition("://")[0].lower() if "://" in url else None
    if scheme not in ("redis", "rediss", "unix"):
        problem = "has no scheme" if scheme is None else f"has scheme {scheme!r}"
        raise ConfigurationError(f"{shown} {problem}; use {REDIS_URL_FORMS}")
    if not _port_is_number(url):
        # urllib's message quotes the text it read as the port, which may be a piece of the password.
        raise ConfigurationError(
            f"{shown} has a port that is not a number (percent-encode any '/', '?', '#' or '@' in the "
            f"password); use {REDIS_URL_FORMS}"
        )
    try:
        options = parse_url(url)
    except ValueError as error:
        raise ConfigurationError(
            f"{shown} is not valid: {redact_text(str(error), url).rstrip('.')}; use {REDIS_URL_FORMS}"
        ) from None
    if scheme == "unix" and not options.get("path"):
        raise ConfigurationError(f"{shown} names no socket; use unix:///path/to/socket")


@functools.lru_cache(maxsize=32)
def check_broker_url(url: str) -> None:
    """Raise ConfigurationError unless ``url`` is a RabbitMQ URL pika can read (scheme amqp or amqps)."""
    shown = f"BROKER_URL={redact_url(url)!r}"
    scheme = url.partition("://")[0].lower() if "://" in url else None
    if scheme not in ("amqp", "amqps"):
        problem = "has no scheme" if scheme is None else f"has scheme {scheme!r}"
        raise ConfigurationError(
            f"{shown} {problem}; use {BROKER_URL_FORMS} for RabbitMQ, or unset it to use Redis (REDIS_URL) "
            "as the broker"
        )
    if not _port_is_number(url):
        raise ConfigurationError(
            f"{shown} has a port that is not a number (percent-encode any '/', '?', '#' or '@' in the "
            f"password); use {BROKER_URL_FORMS}"
        )


@functools.lru_cache(maxsize=32)
def check_database_url(url: str) -> None:
    """Raise ConfigurationError unless SQLAlchemy can parse ``url`` and load its dialect and driver."""
    shown = f"DATABASE_URL={redact_url(url)!r}"
    if not _port_is_number(url):
        raise ConfigurationError(
            f"{shown} has a port that is not a number (percent-encode any '/', '?', '#' or '@' in the "
            f"password); use {DATABASE_URL_FORMS}"
        )
    try:
        parsed = make_url(normalise_database_url(url))
    except (ArgumentError, ValueError):
        raise ConfigurationError(f"{shown} is not a database URL; use {DATABASE_URL_FORMS}") from None
    try:
        dialect = parsed.get_dialect()
    except ArgumentError:  # NoSuchModuleError: no such dialect or driver
        raise ConfigurationError(
            f"{shown} names {parsed.drivername!r}, a dialect+driver SQLAlchemy cannot load; use {DATABASE_URL_FORMS}"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        raise ConfigurationError(
            f"{shown} needs the Python module {error.name or parsed.get_driver_name()!r}, which is not "
            f"installed; install it, or use {DATABASE_URL_FORMS} (their drivers come with this project)"
        ) from None


#: The environment the last settings were read from, and those settings.
_last_read: tuple[dict[Any, Any], Settings] | None = None


def _raw_environment() -> Any:
    """The environment as CPython stores it (encoded bytes on POSIX): copying and comparing that dict runs in
    C, well under a microsecond; ``dict(os.environ)`` decodes every variable in Python (about 30 µs)."""
    raw = getattr(os.environ, "_data", None)
    return raw if isinstance(raw, dict) else dict(os.environ)


@functools.cache
def start_directory() -> Path:
    """The working directory the process started in (read on first use, before anything changes it), which a
    relative ``JOBS_DATA_DIR`` is relative to. Not the current one: asking it costs a system call, which gives
    up the GIL, and settings are read dozens of times per step."""
    return Path.cwd()


def get_settings() -> Settings:
    """The settings of the current environment. Steps ask several times each, so the last ones are kept
    while the environment is unchanged (compared in place, without a copy); a changed variable is seen at
    once."""
    global _last_read
    last, raw = _last_read, _raw_environment()
    if last is not None and last[0] == raw:
        return last[1]
    environment = dict(raw)
    settings = _read_settings()
    _last_read = (environment, settings)
    return settings


def _read_settings() -> Settings:
    data_dir = (start_directory() / (os.environ.get("JOBS_DATA_DIR") or DEFAULT_DATA_DIR)).resolve()
    database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{data_dir / 'jobs.sqlite3'}"
    redis_url = os.environ.get("REDIS_URL") or None
    if redis_url is not None:
        check_redis_url(redis_url)
    check_database_url(database_url)
    amqp_url = os.environ.get("BROKER_URL") or None
    if amqp_url is not None:
        check_broker_url(amqp_url)
    settings = Settings(
        redis_url=redis_url,
        database_url=normalise_database_url(database_url),
        data_dir=data_dir,
        namespace=os.environ.get("JOBS_NAMESPACE") or "jobs",
        poll_interval_s=_env_number("JOBS_POLL_INTERVAL_S", 5.0, float),
        poll_state_attempts=_env_number("JOBS_POLL_STATE_ATTEMPTS", 1200, int),
        poll_check_attempts=_env_number("JOBS_POLL_CHECK_ATTEMPTS", 600, int),
        step_time_limit_s=_env_number("JOBS_STEP_TIME_LIMIT_S", 600.0, float),
        poll_time_limit_s=_env_number("JOBS_POLL_TIME_LIMIT_S", 60.0, float),
        throttle_enabled=_env_switch("JOBS_THROTTLE", True),
        throttle_default_limit=_env_number("JOBS_THROTTLE_DEFAULT_LIMIT", 4, int),
        throttle_lease_s=_env_number("JOBS_THROTTLE_LEASE_S", 10.0, float),
        throttle_heartbeat_s=_env_number("JOBS_THROTTLE_HEARTBEAT_S", 2.0, float),
        throttle_handoff_timeout_s=_env_number("JOBS_THROTTLE_HANDOFF_TIMEOUT_S", 60.0, float),
        broker_heartbeat_timeout_ms=_env_number("JOBS_BROKER_HEARTBEAT_TIMEOUT_MS", 15_000, int),
        broker_maintenance_chance=_env_number("JOBS_BROKER_MAINTENANCE_CHANCE", 1000, int),
        broker_maintenance_interval_s=_env_number("JOBS_BROKER_MAINTENANCE_INTERVAL_S", 5.0, float),
        outbox_grace_s=_env_number("JOBS_OUTBOX_GRACE_S", 5.0, float),
        outbox_relay_interval_s=_env_number("JOBS_OUTBOX_RELAY_INTERVAL_S", 5.0, float),
        step_chain_s=_env_number("JOBS_STEP_CHAIN_S", 30.0, float) if _env_switch("JOBS_STEP_CHAIN", True) else 0.0,
        transient_retries=_env_number("JOBS_TRANSIENT_RETRIES", 10, int),
        operation_retention_days=(
            _env_number("JOBS_OPERATION_RETENTION_DAYS", 30.0, float)
            if _env_switch("JOBS_OPERATION_RETENTION", True)
            else 0.0
        ),
        max_message_bytes=_env_number("JOBS_MAX_MESSAGE_BYTES", 256 * 1024, int),
        scheduler_timezone=_env_zone("JOBS_SCHEDULER_TIMEZONE", "UTC"),
        scheduler_lease_s=_env_number("JOBS_SCHEDULER_LEASE_S", 15.0, float),
        dedup_queued_ttl_s=_env_number("JOBS_DEDUP_QUEUED_TTL_S", 86400.0, float),
        dedup_lease_s=_env_number("JOBS_DEDUP_LEASE_S", 30.0, float),
        stuck_after_s={
            state: _env_number(f"JOBS_STUCK_{state.value}_S", DEFAULT_STUCK_AFTER_S[state], float)
            for state in sorted(TRANSITIONAL_STATES)
        },
        log_format=log_format_from_env(),
        log_level=log_level_from_env(),
        amqp_url=amqp_url,
    )
    if settings.throttle_heartbeat_s >= settings.throttle_lease_s:
        raise ConfigurationError(
            f"JOBS_THROTTLE_HEARTBEAT_S={settings.throttle_heartbeat_s} must be shorter than "
            f"JOBS_THROTTLE_LEASE_S={settings.throttle_lease_s}, or leases expire between renewals; "
            "keep the heartbeat at most a third of the lease"
        )
    return settings
