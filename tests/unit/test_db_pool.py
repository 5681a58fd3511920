"""The engines' pools: each hands a thread back its own last connection, and PostgreSQL's pings a connection only
after it sat idle (``resources.db.ping_idle_connections``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from resources.config import normalise_database_url
from resources.db import ping_idle_connections
from tests.fixtures import wait_for


@pytest.fixture
def postgresql_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgresql", "postgres://")):
        pytest.skip("DATABASE_URL is not a PostgreSQL URL")
    return normalise_database_url(url)


def _engine(url: str, idle_s: float) -> Iterator[Engine]:
    engine = create_engine(url, pool_size=1, max_overflow=0)
    ping_idle_connections(engine, idle_s)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def pinging_engine(postgresql_url: str) -> Iterator[Engine]:
    """Every connection back from the pool counts as idle."""
    yield from _engine(postgresql_url, idle_s=0)


@pytest.fixture
def trusting_engine(postgresql_url: str) -> Iterator[Engine]:
    """No connection is idle long enough to be pinged."""
    yield from _engine(postgresql_url, idle_s=3600)


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(url: str, pid: int) -> None:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            wait_for(lambda: connection.execute(query, {"pid": pid}).scalar_one() == 0, timeout_s=30)
    finally:
        admin.dispose()


def test_an_idle_connection_killed_by_the_server_is_replaced_before_use(
    pinging_engine: Engine, postgresql_url: str
) -> None:
    pid = _backend_pid(pinging_engine)
    _terminate(postgresql_url, pid)  # as a server's idle timeout or a restart would

    assert _backend_pid(pinging_engine) != pid  # no error: the ping found it dead, the pool reconnected


def test_a_connection_in_use_a_moment_ago_is_not_pinged(
    trusting_engine: Engine, pinging_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings: list[Engine] = []
    for engine in (trusting_engine, pinging_engine):
        dialect = engine.dialect
        monkeypatch.setattr(dialect, "do_ping", lambda connection, engine=engine: pings.append(engine) or True)

    for _ in range(3):
        _backend_pid(trusting_engine)
        _backend_pid(pinging_engine)

    # The first checkout of each is a new connection; the two after it were back in the pool.
    assert pings == [pinging_engine, pinging_engine]


def test_a_thread_gets_back_the_connection_it_returned_last():
    # The project's engine for the suite's database (SQLite as a new user runs it, PostgreSQL in CI's second run):
    # with another connection idle in the pool, a thread that commits and starts again is handed its own
    # connection back, whose cache saw its last commit, not the one idle longest.
    from resources.db import get_engine

    engine = get_engine()
    first, second = engine.connect(), engine.connect()
    first_driver, second_driver = first.connection.driver_connection, second.connection.driver_connection
    first.close()
    second.close()  # returned last
    for _ in range(3):
        with engine.connect() as connection:
            assert connection.connection.driver_connection is second_driver
    assert first_driver is not second_driver
