"""A failure to reach Redis or the database, as an error that says which server, why, and what to do.

Command-line tools run their work inside :func:`explain_connection_errors`: a driver's connection error
becomes a :class:`ServiceUnreachable` that names the setting (REDIS_URL or DATABASE_URL) with its
password hidden, the driver's reason with any password stripped (drivers may quote the URL), and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from sqlalchemy import exc as sa_exc

from .config import DATABASE_URL_FORMS, REDIS_URL_FORMS, get_settings
from .errors import ConfigurationError
from .urls import redact_text, redact_url

__all__ = ["ServiceUnreachable", "explain_connection_errors"]


class ServiceUnreachable(ConfigurationError):
    """Redis or the database could not be reached or refused us; the message says which, why and the fix."""


def _configured(variable: str) -> str:
    """How the setting reads in a message: ``REDIS_URL='redis://user:***@host:6379/0'``, or its default."""
    raw = os.environ.get(variable)
    if raw:
        return f"{variable}={redact_url(raw)!r}"
    try:
        settings = get_settings()
        default = settings.broker_url if variable == "REDIS_URL" else settings.database_url
    except ConfigurationError:
        return f"{variable} (unset)"
    return f"{variable} (unset, so {redact_url(default)!r})"


def _reason(error: BaseException) -> str:
    """The driver's own words on one line, without any password of the configured URLs."""
    text = " ".join(str(error).split()) or type(error).__name__
    return redact_text(text, os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")).rstrip(".")


def _is_sqlite() -> bool:
    try:
        return get_settings().database_url.startswith("sqlite")
    except ConfigurationError:
        return False


@contextmanager
def explain_connection_errors() -> Iterator[None]:
    """Turn Redis and database connection errors raised inside the block into :class:`ServiceUnreachable`."""
    try:
        yield
    # The original exception is not chained: a traceback printed later must not show an unredacted URL.
    except redis.AuthenticationError as error:
        raise ServiceUnreachable(
            f"Redis at {_configured('REDIS_URL')} refused the credentials: {_reason(error)}; check the user "
            "name and password in REDIS_URL (redis://user:password@host:port/db for an ACL user, "
            "redis://:password@host:port/db for requirepass)"
        ) from None
    except redis.exceptions.NoPermissionError as error:
        raise ServiceUnreachable(
            f"Redis at {_configured('REDIS_URL')} refused a command to this user: {_reason(error)}; give the "
            "ACL user in REDIS_URL access to every key and command (ACL SETUSER <user> ~* &* +@all) or use another"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise ServiceUnreachable(
            f"cannot reach Redis at {_configured('REDIS_URL')}: {_reason(error)}; start Redis there, or set "
            f"REDIS_URL to a running one ({REDIS_URL_FORMS})"
        ) from None
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as error:
        fix = (
            "check that the file's directory exists and is writable"
            if _is_sqlite()
            else "check that the server is running and reachable from here and that the URL's host, port, "
            "database name, user and password are right"
        )
        raise ServiceUnreachable(
            f"cannot use the database at {_configured('DATABASE_URL')}: {_reason(error.orig or error)}; {fix} "
            f"({DATABASE_URL_FORMS})"
        ) from None
    except sa_exc.ArgumentError as error:
        raise ServiceUnreachable(
            f"the database URL {_configured('DATABASE_URL')} is not usable: {_reason(error)}; set DATABASE_URL "
            f"to {DATABASE_URL_FORMS}"
        ) from None
