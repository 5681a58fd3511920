"""On PostgreSQL, BEGIN, SAVEPOINT and RELEASE SAVEPOINT go out with the next statement
(``resources.pg_piggyback``): fewer round trips, and transactions that behave as before."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Column, Connection, Engine, Integer, MetaData, Table, create_engine, exc, insert, select, text

from resources.config import normalise_database_url
from resources.db import _with_piggyback
from resources.pg_piggyback import PiggybackDialect, defer_write

_METADATA = MetaData()
_ROWS = Table("piggyback_rows", _METADATA, Column("id", Integer, primary_key=True))


@pytest.fixture
def engine() -> Iterator[Engine]:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgresql", "postgres://")):
        pytest.skip("DATABASE_URL is not a PostgreSQL URL")
    engine = create_engine(_with_piggyback(normalise_database_url(url)), pool_size=1, max_overflow=0)
    assert isinstance(engine.dialect, PiggybackDialect)
    _METADATA.drop_all(engine)
    _METADATA.create_all(engine)
    try:
        yield engine
    finally:
        _METADATA.drop_all(engine)
        engine.dispose()


class RoundTrips:
    """Counts the round trips of a pooled connection: each ends with the server's ReadyForQuery."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._file = tempfile.NamedTemporaryFile(suffix=".trace", delete=False)  # noqa: SIM115
        self.path = Path(self._file.name)

    def __enter__(self) -> RoundTrips:
        with self.engine.connect() as connection:
            self.driver = connection.connection.dbapi_connection
        self.driver.pgconn.trace(self._file.fileno())
        self.driver.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.driver.pgconn.untrace()
        self._file.close()

    def count(self) -> int:
        """After the block: libpq's trace is buffered until it stops."""
        lines = self.path.read_text().splitlines()
        return sum(1 for line in lines if line.startswith("B") and "ReadyForQuery" in line)


def _ids(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.scalars(select(_ROWS.c.id).order_by(_ROWS.c.id)))


def test_a_transaction_with_a_released_savepoint_takes_three_round_trips(engine: Engine) -> None:
    with RoundTrips(engine) as trips, engine.begin() as connection:
        connection.execute(select(_ROWS.c.id)).all()  # BEGIN goes with it
        with connection.begin_nested():
            connection.execute(insert(_ROWS), {"id": 1})  # SAVEPOINT goes with it
            # RELEASE is owed to the next statement; COMMIT ends the savepoint anyway
    assert trips.count() == 3  # was six: BEGIN, SELECT, SAVEPOINT, INSERT, RELEASE, COMMIT
    assert _ids(engine) == [1]


def test_a_transaction_that_runs_no_statement_costs_no_round_trip(engine: Engine) -> None:
    with RoundTrips(engine) as trips, engine.begin() as connection, connection.begin_nested():
        pass
    assert trips.count() == 0


def test_a_savepoint_rolled_back_undoes_only_its_own_work(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(insert(_ROWS), {"id": 1})
        savepoint = connection.begin_nested()
        connection.execute(insert(_ROWS), {"id": 2})
        savepoint.rollback()
        connection.execute(insert(_ROWS), {"id": 3})
    assert _ids(engine) == [1, 3]


def test_a_released_savepoint_is_released_before_the_next_one(engine: Engine) -> None:
    with engine.begin() as connection:
        with connection.begin_nested():
            connection.execute(insert(_ROWS), {"id": 1})
        savepoint = connection.begin_nested()  # RELEASE of the first and this SAVEPOINT, in order, with the insert
        connection.execute(insert(_ROWS), {"id": 2})
        savepoint.rollback()
    assert _ids(engine) == [1]


def test_a_failed_statement_inside_a_savepoint_leaves_the_transaction_usable(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(insert(_ROWS), {"id": 1})
        with pytest.raises(exc.IntegrityError), connection.begin_nested():
            connection.execute(insert(_ROWS), {"id": 1})  # a duplicate key
        connection.execute(insert(_ROWS), {"id": 2})
    assert _ids(engine) == [1, 2]


def test_a_failed_first_statement_rolls_back_and_the_connection_is_reused(engine: Engine) -> None:
    with pytest.raises(exc.ProgrammingError), engine.begin() as connection:
        connection.execute(text("SELECT * FROM no_such_table"))
    with engine.begin() as connection:  # the pool's one connection, back in a clean state
        connection.execute(insert(_ROWS), {"id": 1})
    assert _ids(engine) == [1]


def test_a_connection_returned_with_its_transaction_open_is_rolled_back(engine: Engine) -> None:
    connection = engine.connect()
    connection.execute(insert(_ROWS), {"id": 1})
    connection.close()  # no commit
    assert _ids(engine) == []
    with engine.connect() as again:
        assert again.connection.dbapi_connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_the_transaction_ends_with_its_commit_not_before(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(insert(_ROWS), {"id": 1})
        other = create_engine(engine.url)
        try:
            assert _ids(other) == []  # another connection does not see it yet: it is in a transaction
        finally:
            other.dispose()
    assert _ids(engine) == [1]


def test_autocommit_connections_commit_each_statement(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(insert(_ROWS), {"id": 1})
        assert connection.get_isolation_level() == "AUTOCOMMIT"
        connection.rollback()  # nothing to roll back: the insert committed on its own
    assert _ids(engine) == [1]


def test_an_isolation_level_applies_to_the_transaction(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="SERIALIZABLE") as connection:
        assert connection.scalar(text("SHOW transaction_isolation")) == "serializable"
    with engine.connect() as connection:  # back to the default once returned to the pool
        assert connection.scalar(text("SHOW transaction_isolation")) == "read committed"


def test_a_read_only_transaction_refuses_writes(engine: Engine) -> None:
    read_only = engine.connect().execution_options(postgresql_readonly=True)
    with read_only as connection, pytest.raises(exc.InternalError, match="read-only transaction"):
        connection.execute(insert(_ROWS), {"id": 1})


def test_executemany_after_a_savepoint(engine: Engine) -> None:
    with engine.begin() as connection, connection.begin_nested():
        connection.execute(insert(_ROWS), [{"id": 1}, {"id": 2}, {"id": 3}])
    assert _ids(engine) == [1, 2, 3]


# -- writes deferred to the next statement (defer_write) ------------------------------------------------------

_INSERT_SQL = "INSERT INTO piggyback_rows (id) VALUES (%(id)s)"


def _defer(connection: Connection, row_id: int) -> None:
    defer_write(connection.connection, _INSERT_SQL, {"id": row_id})


def test_a_deferred_write_goes_with_the_commit_in_its_round_trip(engine: Engine) -> None:
    with RoundTrips(engine) as trips, engine.begin() as connection:
        connection.execute(select(_ROWS.c.id)).all()  # BEGIN goes with it
        with connection.begin_nested():
            _defer(connection, 1)
    assert trips.count() == 2  # the read, then the insert with the COMMIT
    assert _ids(engine) == [1]


def test_a_deferred_write_goes_before_the_next_statement_which_sees_it(engine: Engine) -> None:
    with RoundTrips(engine) as trips, engine.begin() as connection:
        _defer(connection, 1)
        assert connection.scalars(select(_ROWS.c.id)).all() == [1]  # BEGIN, the insert and the read together
    assert trips.count() == 2
    assert _ids(engine) == [1]


def test_a_deferred_write_in_a_savepoint_rolled_back_is_dropped(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(insert(_ROWS), {"id": 1})
        savepoint = connection.begin_nested()
        _defer(connection, 2)
        savepoint.rollback()  # never sent: dropped
        with connection.begin_nested():
            connection.execute(insert(_ROWS), {"id": 3})  # sent, with its SAVEPOINT
            inner = connection.begin_nested()
            _defer(connection, 4)
            inner.rollback()
    assert _ids(engine) == [1, 3]


def test_a_deferred_write_in_a_savepoint_released_before_anything_was_sent_is_kept(engine: Engine) -> None:
    with engine.begin() as connection:
        with connection.begin_nested(), connection.begin_nested():
            _defer(connection, 1)
        savepoint = connection.begin_nested()
        _defer(connection, 2)
        savepoint.rollback()
    assert _ids(engine) == [1]


def test_a_deferred_write_that_fails_fails_the_commit_and_the_connection_is_reused(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(insert(_ROWS), {"id": 1})
    with pytest.raises(exc.IntegrityError), engine.begin() as connection:
        connection.execute(insert(_ROWS), {"id": 2})
        _defer(connection, 1)  # a duplicate key, found at the commit
    with engine.begin() as connection:  # the pool's one connection, back in a clean state
        connection.execute(insert(_ROWS), {"id": 3})
    assert _ids(engine) == [1, 3]  # nothing of the failed transaction


def test_a_rollback_drops_a_deferred_write(engine: Engine) -> None:
    with RoundTrips(engine) as trips, engine.connect() as connection:
        connection.execute(select(_ROWS.c.id)).all()
        _defer(connection, 1)
        connection.rollback()
    assert trips.count() == 2  # the read, and the ROLLBACK alone
    assert _ids(engine) == []


def test_a_connection_returned_idle_is_not_rolled_back_by_psycopg(engine: Engine, monkeypatch) -> None:
    # Given psycopg's rollback counted
    rollbacks: list[object] = []
    original = psycopg.Connection.rollback

    def counted(self: psycopg.Connection) -> None:
        rollbacks.append(self)
        original(self)

    monkeypatch.setattr(psycopg.Connection, "rollback", counted)

    # When a committed transaction's connection and an autocommitted one go back to the pool (which resets them)
    with engine.begin() as connection:
        connection.execute(insert(_ROWS), {"id": 1})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(insert(_ROWS), {"id": 2})
    # Then psycopg was not asked to roll either back: the server had no transaction open
    assert rollbacks == []

    # ... while a connection returned inside a transaction is
    connection = engine.connect()
    connection.execute(insert(_ROWS), {"id": 3})
    connection.close()
    assert len(rollbacks) == 1
    assert _ids(engine) == [1, 2]
