"""Test set-up shared by unit and integration tests.

As a new user runs it (no REDIS_URL, no DATABASE_URL) the suite starts a private embedded Redis and
uses a temporary SQLite file. With REDIS_URL / DATABASE_URL set, it uses those servers, keeping its
Redis keys under a namespace of its own and its tables in the given database.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

#: Whether this run was given servers (REDIS_URL or DATABASE_URL) rather than run as a new user; read before
#: the defaults below and the embedded Redis fill them in.
GIVEN_SERVERS = bool(os.environ.get("REDIS_URL") or os.environ.get("DATABASE_URL"))

# Configure before any project module is imported: actors bind to the broker current at import.
os.environ["JOBS_BROKER"] = "stub"
os.environ["JOBS_NAMESPACE"] = f"jobs-test-{uuid.uuid4().hex[:8]}"
os.environ["JOBS_POLL_INTERVAL_S"] = "0.02"
os.environ["JOBS_MIN_BACKOFF_MS"] = "20"
_TMP = tempfile.mkdtemp(prefix="jobs-tests-")
os.environ.setdefault("DATABASE_URL", f"sqlite:///{_TMP}/unit.sqlite3")
SQLITE_INTEGRATION_URL = f"sqlite:///{_TMP}/integration.sqlite3"

import pytest  # noqa: E402

from jobs.embedded_redis import EmbeddedRedis  # noqa: E402

_embedded: EmbeddedRedis | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _embedded
    if not os.environ.get("REDIS_URL"):
        _embedded = EmbeddedRedis()
        os.environ["REDIS_URL"] = _embedded.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()
        os.environ.pop("REDIS_URL", None)
    shutil.rmtree(_TMP, ignore_errors=True)
    _cleanup_namespace()


def _cleanup_namespace() -> None:
    if _embedded is not None:
        return  # the server is gone with everything in it
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    keys = list(client.scan_iter(f"{os.environ['JOBS_NAMESPACE']}:*", count=1000))
    if keys:
        client.delete(*keys)


pytest_plugins = ["tests.fixtures"]
