"""Statements that run around every step, on a pooled driver connection without a SQLAlchemy Connection.

A Connection's bookkeeping (its events, its transaction's state, its result objects) costs about 70 µs per
statement on SQLite, several times what a one-row statement by primary key costs the database, and a Session
costs more again: the check before a step, the read after its mark and the last step's record pay it for every
operation a worker runs (on SQLite the record pays it while it holds the one write turn). Here the statement is
still SQLAlchemy's: compiled once per dialect, its parameters and its results converted by its column types, the
driver's errors raised as SQLAlchemy's (so a dropped connection is an ``OperationalError``, which the steps
retry). What is left out is what these statements do not need: events, and for reads a transaction (each reads
a snapshot of its own: pysqlite and the PostgreSQL dialect leave the driver in autocommit).

Written by hand: SQLAlchemy has no lighter way to run a compiled statement than a Connection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Executable, Insert
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

from . import pg_piggyback
from .db import get_engine, joined_session
from .sqlite_turns import TurnTakingConnection

__all__ = [
    "QuickRows",
    "QuickStatements",
    "insert_with_next_statement",
    "names_every_column",
    "quick_autocommit",
    "quick_insert",
    "quick_reads",
    "quick_write",
]


class _Compiled:
    """A statement compiled for one dialect: its SQL, how to make its parameters, how to convert its columns."""

    def __init__(self, statement: Any, dialect: Dialect, column_keys: tuple[str, ...] | None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise TypeError(
                f"{statement} has parameters rendered at execution (an IN list, a literal): run it through a "
                "Connection instead"
            )
        self._compiled = compiled
        self.sql = compiled.string
        self._positions: Sequence[str] | None = compiled.positiontup
        self._binds: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._binds[name] = process
        # The compiled statement's own list of its result columns, as SQLAlchemy's results read it (a statement's
        # exported_columns can be stale: one copied by .returning() keeps its original's, memoized, empty).
        types = [entry.type for entry in compiled._result_columns]
        self._converters = [type_.dialect_impl(dialect).result_processor(dialect, None) for type_ in types]

    def parameters(self, values: Mapping[str, Any]) -> Any:
        given = self._compiled.construct_params(values)  # with the statement's own values (literals, defaults)
        for name, process in self._binds.items():
            if name in given:
                given[name] = process(given[name])
        if self._positions is None:  # named parameters (PostgreSQL's psycopg)
            return given
        return [given[name] for name in self._positions]

    def convert(self, row: Sequence[Any]) -> tuple[Any, ...]:
        pairs = zip(self._converters, row, strict=True)
        return tuple(value if convert is None else convert(value) for convert, value in pairs)


@functools.cache
def _compiled(statement: Any, dialect: Dialect, column_keys: tuple[str, ...] | None = None) -> _Compiled:
    return _Compiled(statement, dialect, column_keys)


def _of(statement: Executable, dialect: Dialect, parameters: Mapping[str, Any]) -> _Compiled:
    # An insert names the columns it is given, as SQLAlchemy compiles it for a Connection.
    keys = tuple(parameters) if isinstance(statement, Insert) else None
    return _compiled(statement, dialect, keys)


class QuickRows:
    """The rows of one statement, converted."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def one_or_none(self) -> tuple[Any, ...] | None:
        if len(self.rows) > 1:
            raise ValueError(f"expected at most one row, got {len(self.rows)}")
        return self.rows[0] if self.rows else None


class QuickStatements:
    """Runs Core statements on one pooled driver connection (``execute``, ``scalars``, as a Connection has, and
    ``executemany``). A connection the dialect finds dead leaves the pool."""

    def __init__(self, dialect: Dialect, pooled: PoolProxiedConnection) -> None:
        self._dialect = dialect
        self._pooled = pooled

    def execute(self, statement: Executable, parameters: Mapping[str, Any]) -> QuickRows:
        compiled = _of(statement, self._dialect, parameters)
        with self._cursor(compiled.sql, parameters) as cursor:
            cursor.execute(compiled.sql, compiled.parameters(parameters))
            rows = cursor.fetchall() if cursor.description else []
            return QuickRows([compiled.convert(row) for row in rows])

    def executemany(self, statement: Executable, parameters: Sequence[Mapping[str, Any]]) -> None:
        compiled = _of(statement, self._dialect, parameters[0])
        with self._cursor(compiled.sql, parameters) as cursor:
            cursor.executemany(compiled.sql, [compiled.parameters(each) for each in parameters])

    def scalars(self, statement: Executable, parameters: Mapping[str, Any]) -> list[Any]:
        return [row[0] for row in self.execute(statement, parameters).rows]

    @contextmanager
    def _cursor(self, sql: str, parameters: Any) -> Iterator[Any]:
        cursor = self._pooled.driver_connection.cursor()
        try:
            with _as_sqlalchemy_errors(self._dialect, self._pooled, sql, parameters, cursor):
                yield cursor
        finally:
            cursor.close()


@contextmanager
def _as_sqlalchemy_errors(
    dialect: Dialect, pooled: PoolProxiedConnection, sql: str, parameters: Any, cursor: Any = None
) -> Iterator[None]:
    """The driver's errors raised as SQLAlchemy's, as a Connection raises them; a dead connection invalidated."""
    try:
        yield
    except dialect.loaded_dbapi.Error as error:
        dead = dialect.is_disconnect(error, pooled.driver_connection, cursor)
        if dead:
            pooled.invalidate(error)
        raise DBAPIError.instance(
            sql, parameters, error, dialect.loaded_dbapi.Error, connection_invalidated=dead, dialect=dialect
        ) from error


@contextmanager
def quick_reads(url: str | None = None) -> Iterator[QuickStatements | Session]:
    """``QuickStatements`` for reads on a connection from the pool, returned to it afterwards. Inside
    ``join_session``, the caller's session instead: the reads must see its transaction."""
    joined = joined_session()
    if joined is not None and url is None:
        yield joined
        return
    with _pooled(get_engine(url)) as statements:
        yield statements


@contextmanager
def _pooled(engine: Engine) -> Iterator[QuickStatements]:
    """``QuickStatements`` on a connection from ``engine``'s pool, returned to it afterwards."""
    pooled = engine.raw_connection()
    try:
        yield QuickStatements(engine.dialect, pooled)
    finally:
        pooled.close()


@contextmanager
def quick_autocommit(url: str | None = None) -> Iterator[QuickStatements | None]:
    """On PostgreSQL, ``QuickStatements`` whose every statement commits on its own, for a write that is one
    statement. None on SQLite (its writers take turns at BEGIN: see ``quick_write``) and inside ``join_session``,
    where the caller's transaction decides."""
    engine = get_engine(url)
    if engine.dialect.name != "postgresql" or (joined_session() is not None and url is None):
        yield None
        return
    with _pooled(engine) as statements:  # the dialect keeps the driver in autocommit (pg_piggyback)
        yield statements


@contextmanager
def quick_write(url: str | None = None) -> Iterator[QuickStatements | None]:
    """On SQLite, a write transaction through ``QuickStatements``: it takes the write turn and begins as a
    session's does (``resources.db``), commits when the block ends and rolls back if it raises. None on other
    databases and inside ``join_session``, where the caller's transaction decides."""
    engine = get_engine(url)
    if engine.dialect.name != "sqlite" or (joined_session() is not None and url is None):
        yield None
        return
    pooled = engine.raw_connection()
    try:
        driver = pooled.driver_connection
        with _as_sqlalchemy_errors(engine.dialect, pooled, "BEGIN IMMEDIATE", ()):
            if isinstance(driver, TurnTakingConnection):
                driver.begin_write()
            else:
                driver.execute("BEGIN IMMEDIATE")
        try:
            yield QuickStatements(engine.dialect, pooled)
        except BaseException:
            driver.rollback()
            raise
        with _as_sqlalchemy_errors(engine.dialect, pooled, "COMMIT", ()):
            driver.commit()
    finally:
        pooled.close()


def quick_insert(session: Session, statement: Insert, parameters: Mapping[str, Any]) -> None:
    """``session.execute(statement, parameters)`` for an insert nothing reads back, in the session's transaction.

    On SQLite, when ``parameters`` name every column, it runs on the transaction's driver connection as
    ``QuickStatements`` do, after the session's autoflush (so the order of the writes is the same): about 60 µs
    less per row, in the caller's ``execute()`` of every operation. Like every statement here, it fires no
    Connection events (a ``before_cursor_execute`` listener does not see it; SQLite's trace callback does).
    Otherwise it goes through the session: the models' Python defaults are applied by a Connection, and
    PostgreSQL's dialect sends a transaction's BEGIN and savepoints with its next statement (``pg_piggyback``)."""
    connection = session.connection()
    if connection.dialect.name != "sqlite" or not names_every_column(statement, parameters):
        session.execute(statement, parameters)
        return
    if session.autoflush:
        session.flush()
    QuickStatements(connection.dialect, connection.connection).execute(statement, parameters)


def insert_with_next_statement(session: Session, statement: Insert, parameters: Mapping[str, Any]) -> bool:
    """On PostgreSQL through the project's dialect (``pg_piggyback``), make ``session``'s transaction owe the server
    this insert, which goes with the transaction's next statement, usually its COMMIT: a round trip less. The
    insert is whole (``parameters`` name every column) and nothing reads it back before the next statement; its
    error, if any, is that statement's. After the session's autoflush, so the writes keep their order. False,
    having done nothing, elsewhere."""
    connection = session.connection()
    if connection.dialect.driver != pg_piggyback.DRIVER or not names_every_column(statement, parameters):
        return False
    if session.autoflush:
        session.flush()
    compiled = _of(statement, connection.dialect, parameters)
    pg_piggyback.defer_write(connection.connection, compiled.sql, compiled.parameters(parameters))
    return True


def names_every_column(statement: Insert, parameters: Mapping[str, Any]) -> bool:
    """Do ``parameters`` give every column of the insert's table? Only then is an insert whole without the models'
    Python defaults, which a Connection applies and a statement run otherwise does not."""
    return parameters.keys() >= _column_keys(statement.table)


@functools.cache
def _column_keys(table: Any) -> frozenset[str]:
    return frozenset(column.key for column in table.c)
