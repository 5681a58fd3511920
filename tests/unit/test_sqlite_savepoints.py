"""On SQLite, savepoint statements are sent as text instead of being compiled anew on every use, SAVEPOINT and
RELEASE SAVEPOINT by the driver itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from resources.db import get_engine
from resources.sqlite_savepoints import SavepointTextDialect


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = get_engine(f"sqlite:///{tmp_path / 'savepoints.sqlite3'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    return engine


@pytest.fixture
def sent(engine: Engine) -> list[str]:
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    yield statements
    event.remove(engine, "before_cursor_execute", note)


@pytest.fixture
def traced(engine: Engine) -> list[str]:
    """What SQLite itself ran on the engine's connections (its trace callback), from here on."""
    statements: list[str] = []

    @event.listens_for(engine, "connect")
    def trace(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    engine.dispose()  # the connections made from now on are traced
    yield statements
    event.remove(engine, "connect", trace)


@pytest.fixture
def never_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("a savepoint clause was compiled")

    for visit in ("visit_savepoint", "visit_release_savepoint", "visit_rollback_to_savepoint"):
        monkeypatch.setattr(SQLCompiler, visit, refuse)


def test_sqlite_urls_load_the_dialect(engine):
    assert isinstance(engine.dialect, SavepointTextDialect)
    assert engine.dialect.name == "sqlite"


def test_a_released_savepoint_keeps_its_changes_and_one_rolled_back_drops_them(engine, sent, traced, never_compiled):
    # Given a session's transaction with two savepoints: one released, one rolled back
    with Session(engine) as session, session.begin():
        with session.begin_nested():
            session.execute(text("INSERT INTO t VALUES (1)"))
        nested = session.begin_nested()
        session.execute(text("INSERT INTO t VALUES (2)"))
        nested.rollback()

    # Then the first insert stayed and the second is gone, and the savepoints went as text, never compiled
    with engine.connect() as connection:
        assert connection.execute(text("SELECT x FROM t")).scalars().all() == [1]
    assert [s for s in traced if "SAVEPOINT" in s] == [
        "SAVEPOINT sa_savepoint_1",
        "RELEASE SAVEPOINT sa_savepoint_1",
        "SAVEPOINT sa_savepoint_2",
        "ROLLBACK TO SAVEPOINT sa_savepoint_2",
    ]
    # SAVEPOINT and RELEASE SAVEPOINT by the driver, without a Connection's execution; the rollback through one
    assert [s for s in sent if "SAVEPOINT" in s] == ["ROLLBACK TO SAVEPOINT sa_savepoint_2"]


def test_a_savepoint_statement_the_driver_refuses_raises_sqlalchemys_error(engine):
    # Given a transaction with no savepoint of that name; when one of that name is released,
    # Then the driver's error comes as SQLAlchemy's, naming the statement
    with (
        engine.connect() as connection,
        connection.begin(),
        pytest.raises(OperationalError, match="RELEASE SAVEPOINT missing"),
    ):
        engine.dialect.do_release_savepoint(connection, "missing")
