"""Reads that run before and after every step, on a pooled driver connection without a SQLAlchemy Connection.

A Connection's bookkeeping (its events, its transaction's state, its result objects) costs about 70 µs per
statement on SQLite, several times what a one-row read by primary key costs the database; a step's check and
the read after its mark pay it on every step a worker runs. Here the statement is still SQLAlchemy's: compiled
once per dialect, its results converted by its column types. What is left out is what these reads do not need:
a transaction (each statement reads a snapshot of its own: pysqlite and the PostgreSQL dialect leave the driver
in autocommit), events, and parameters that need converting (only text parameters are taken).

Written by hand: SQLAlchemy has no lighter way to run a compiled statement than a Connection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Select, String
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

from .db import get_engine, joined_session

__all__ = ["QuickReader", "QuickRows", "quick_reads"]


class _Compiled:
    """A select compiled for one dialect: its SQL, how to order its parameters, how to convert its columns."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        for name, bind in compiled.binds.items():
            if not isinstance(bind.type, String):
                raise TypeError(
                    f"quick reads take text parameters only; {name!r} of {statement} is {bind.type!r}: run it "
                    "through a Connection instead"
                )
        self.sql = compiled.string
        self.positions: Sequence[str] | None = compiled.positiontup
        self.converters: list[Callable[[Any], Any] | None] = [
            column.type.result_processor(dialect, None) for column in statement.selected_columns
        ]

    def parameters(self, values: Mapping[str, Any]) -> Any:
        if self.positions is None:  # named parameters (PostgreSQL's psycopg)
            return dict(values)
        return [values[name] for name in self.positions]

    def convert(self, row: Sequence[Any]) -> tuple[Any, ...]:
        pairs = zip(self.converters, row, strict=True)
        return tuple(value if convert is None else convert(value) for convert, value in pairs)


@functools.cache
def _compiled(statement: Select[Any], dialect: Dialect) -> _Compiled:
    return _Compiled(statement, dialect)


class QuickRows:
    """The rows of one read, converted."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def one_or_none(self) -> tuple[Any, ...] | None:
        if len(self.rows) > 1:
            raise ValueError(f"expected at most one row, got {len(self.rows)}")
        return self.rows[0] if self.rows else None

    def all(self) -> list[tuple[Any, ...]]:
        return self.rows


class QuickReader:
    """Runs Core selects on one pooled driver connection (``execute`` and ``scalars``, as a Connection has).
    The driver's errors are raised as SQLAlchemy's, as a Connection raises them (so a dropped connection is an
    ``OperationalError``, which the steps retry), and a connection found dead leaves the pool."""

    def __init__(self, dialect: Dialect, pooled: PoolProxiedConnection) -> None:
        self._dialect = dialect
        self._pooled = pooled

    def execute(self, statement: Select[Any], parameters: Mapping[str, Any]) -> QuickRows:
        compiled = _compiled(statement, self._dialect)
        connection = self._pooled.driver_connection
        cursor = connection.cursor()
        try:
            cursor.execute(compiled.sql, compiled.parameters(parameters))
            return QuickRows([compiled.convert(row) for row in cursor.fetchall()])
        except self._dialect.loaded_dbapi.Error as error:
            dead = self._dialect.is_disconnect(error, connection, cursor)
            if dead:
                self._pooled.invalidate(error)
            raise DBAPIError.instance(
                compiled.sql,
                parameters,
                error,
                self._dialect.loaded_dbapi.Error,
                connection_invalidated=dead,
                dialect=self._dialect,
            ) from error
        finally:
            cursor.close()

    def scalars(self, statement: Select[Any], parameters: Mapping[str, Any]) -> list[Any]:
        return [row[0] for row in self.execute(statement, parameters).rows]


@contextmanager
def quick_reads(url: str | None = None) -> Iterator[QuickReader | Session]:
    """A ``QuickReader`` on a connection from the pool, returned to it afterwards. Inside ``join_session``, the
    caller's session instead: the reads must see its transaction."""
    joined = joined_session()
    if joined is not None and url is None:
        yield joined
        return
    engine = get_engine(url)
    pooled = engine.raw_connection()
    try:
        yield QuickReader(engine.dialect, pooled)
    finally:
        pooled.close()
