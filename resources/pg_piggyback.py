"""PostgreSQL through psycopg with fewer round trips: BEGIN, SAVEPOINT and RELEASE SAVEPOINT wait, and go out
with the next statement in one round trip (psycopg's pipeline mode); so may a write that nothing reads back.

psycopg sends a transaction's BEGIN on its own, before the first statement, and SQLAlchemy sends every SAVEPOINT
and RELEASE SAVEPOINT on its own: round trips whose answers nothing needs. A service's ``execute()`` paid six
(BEGIN, its read, SAVEPOINT, the insert, RELEASE, COMMIT); with this dialect it pays three. Over loopback a
round trip is about 0.1 ms of both sides' CPU; to a database in another zone, a millisecond or more of the
request's time.

How: the driver connection stays in psycopg's autocommit mode, so psycopg begins nothing itself, and the dialect
keeps the statements a transaction owes the server until the next statement needs them:

- ``BEGIN`` (with the isolation level) waits for the transaction's first statement. A transaction that runs
  none costs no round trip at all.
- ``SAVEPOINT`` waits for the next statement. When the savepoint is released or rolled back to before one ran,
  nothing was sent, and nothing needs to be.
- ``RELEASE SAVEPOINT`` waits for the next statement, and is dropped by a COMMIT or ROLLBACK, which ends every
  savepoint anyway.
- ``ROLLBACK TO SAVEPOINT`` (an error path) goes at once: the transaction may be in its failed state.
- A write nothing reads back may be owed too (``defer_write``: ``execute()``'s record of an operation): it goes
  with the next statement, or with the COMMIT, whose round trip it then shares. A rollback drops it, as it
  would undo it; its error is the error of the statement or the commit it went with.

A statement that fails fails as before: the server ran what went ahead of it, and the transaction is then in
its failed state until a rollback. These statements skip SQLAlchemy's cursor events and echo.

Written by hand: neither SQLAlchemy nor psycopg defers these statements, and psycopg's own pipeline waits for
a BEGIN's answer before it sends the next statement.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

__all__ = ["DRIVER", "PiggybackDialect", "defer_write", "register"]

#: The dialect's name in SQLAlchemy URLs: ``postgresql+<DRIVER>://``.
DRIVER = "psycopg_piggyback"

_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE: no transaction open on the server


class _Control:
    """A driver connection's transaction as the dialect keeps it: whether SQLAlchemy asked for autocommit, the
    isolation level to begin with, and the statements owed to the server."""

    __slots__ = ("autocommit", "deferrable", "isolation_level", "owed", "read_only")

    def __init__(self) -> None:
        self.autocommit = False
        self.isolation_level: str | None = None  # None: the server's default
        self.read_only: bool | None = None
        self.deferrable: bool | None = None
        #: Statements owed, in order: plain SQL, or (SQL, parameters) of a write deferred to the next statement.
        self.owed: list[bytes | tuple[str, Any]] = []

    def begin(self) -> bytes:
        parts = ["BEGIN"]
        if self.isolation_level is not None:
            parts.append(f"ISOLATION LEVEL {self.isolation_level}")
        if self.read_only is not None:
            parts.append("READ ONLY" if self.read_only else "READ WRITE")
        if self.deferrable is not None:
            parts.append("DEFERRABLE" if self.deferrable else "NOT DEFERRABLE")
        return " ".join(parts).encode()


def _driver_connection(connection: Any) -> psycopg.Connection[Any]:
    """The psycopg connection behind what SQLAlchemy passes: a Connection, a pool's proxy, or the driver's own."""
    if isinstance(connection, Connection):
        connection = connection.connection
    driver = getattr(connection, "driver_connection", connection)
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(f"{type(connection).__name__} is not a psycopg connection or one of SQLAlchemy's around one")
    return driver


def _control(connection: Any) -> _Control:
    driver = _driver_connection(connection)
    control = getattr(driver, "_piggyback", None)
    if control is None:  # a connection made before this dialect's connect hook ran
        control = driver._piggyback = _Control()  # type: ignore[attr-defined]
        driver.autocommit = True
    return control


class PiggybackDialect(PGDialect_psycopg):
    """``postgresql+psycopg`` whose BEGIN, SAVEPOINT and RELEASE SAVEPOINT ride on the next statement."""

    driver = DRIVER
    supports_statement_cache = True

    # -- connections ---------------------------------------------------------------------------------------
    def on_connect(self) -> Any:
        inherited = super().on_connect()

        def on_connect(driver_connection: Any) -> None:
            driver_connection._piggyback = _Control()
            driver_connection.autocommit = True  # the dialect begins transactions, not psycopg
            if inherited is not None:
                inherited(driver_connection)

        return on_connect

    def set_isolation_level(self, dbapi_connection: Any, level: str) -> None:
        control = _control(dbapi_connection)
        control.autocommit = level == "AUTOCOMMIT"
        if not control.autocommit:
            control.isolation_level = level

    def get_isolation_level(self, dbapi_connection: Any) -> Any:
        control = _control(dbapi_connection)
        if control.autocommit:
            return "AUTOCOMMIT"
        return control.isolation_level or super().get_isolation_level(dbapi_connection)

    def set_readonly(self, connection: Any, value: bool) -> None:
        _control(connection).read_only = value

    def get_readonly(self, connection: Any) -> bool:
        return bool(_control(connection).read_only)

    def set_deferrable(self, connection: Any, value: bool) -> None:
        _control(connection).deferrable = value

    def get_deferrable(self, connection: Any) -> bool:
        return bool(_control(connection).deferrable)

    def detect_autocommit_setting(self, dbapi_connection: Any) -> bool:
        return _control(dbapi_connection).autocommit

    def _do_autocommit(self, connection: Any, value: bool) -> None:
        _control(connection).autocommit = value

    # -- transactions ----------------------------------------------------------------------------------------
    def do_begin(self, dbapi_connection: Any) -> None:
        control = _control(dbapi_connection)
        if not control.autocommit and _driver_connection(dbapi_connection).info.transaction_status == _IDLE:
            control.owed = [control.begin()]

    def do_commit(self, dbapi_connection: Any) -> None:
        control = _control(dbapi_connection)
        owed, control.owed = control.owed, []
        driver = _driver_connection(dbapi_connection)
        if any(isinstance(item, tuple) for item in owed):
            # A deferred write goes now, with the BEGIN it may owe and the COMMIT, in one round trip (the savepoints
            # still owed change nothing that the COMMIT does not end); its error is the commit's, and leaves the
            # transaction failed, for the rollback that follows.
            with driver.pipeline():
                helper = driver.cursor()
                for item in owed:
                    if isinstance(item, tuple) or item.startswith(b"BEGIN"):
                        _execute(helper, item)
                helper.execute(b"COMMIT")
            return
        # Otherwise an unsent BEGIN began nothing, and COMMIT releases every savepoint.
        driver.commit()  # sends COMMIT only if the server has a transaction open

    def do_rollback(self, dbapi_connection: Any) -> None:
        _control(dbapi_connection).owed.clear()
        driver = _driver_connection(dbapi_connection)
        # psycopg's rollback would find the same and send nothing, but behind its lock and its wait loop: the pool
        # rolls back every connection it gets back (most often idle: an autocommitted statement, a commit).
        if driver.info.transaction_status != _IDLE:
            driver.rollback()

    def do_savepoint(self, connection: Any, name: str) -> None:
        _control(connection).owed.append(b"SAVEPOINT " + self._savepoint_name(name))

    def do_release_savepoint(self, connection: Any, name: str) -> None:
        control = _control(connection)
        if not _forget_unsent(control, b"SAVEPOINT " + self._savepoint_name(name), keep_writes=True):
            control.owed.append(b"RELEASE SAVEPOINT " + self._savepoint_name(name))

    def do_rollback_to_savepoint(self, connection: Any, name: str) -> None:
        control = _control(connection)
        if _forget_unsent(control, b"SAVEPOINT " + self._savepoint_name(name)):
            return  # no statement ran inside it
        control.owed.clear()  # releases of savepoints inside it, which the rollback ends anyway
        _driver_connection(connection).execute(b"ROLLBACK TO SAVEPOINT " + self._savepoint_name(name))

    def _savepoint_name(self, name: str) -> bytes:
        return self.identifier_preparer.format_savepoint(None, name).encode()

    # -- statements ------------------------------------------------------------------------------------------
    def do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        _with_owed(cursor, lambda: cursor.execute(statement, parameters))

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any = None) -> None:
        _with_owed(cursor, lambda: cursor.execute(statement))

    def do_executemany(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        _send_owed(cursor.connection)  # executemany pipelines its own statements
        cursor.executemany(statement, parameters)


def _forget_unsent(control: _Control, savepoint: bytes, *, keep_writes: bool = False) -> bool:
    """Drop ``savepoint`` and what came after it if it was never sent: nothing ran inside it on the server. With
    ``keep_writes`` (a release, which keeps them), the deferred writes after it stay owed. False if it was sent."""
    try:
        index = control.owed.index(savepoint)
    except ValueError:
        return False
    kept = [item for item in control.owed[index + 1 :] if isinstance(item, tuple)] if keep_writes else []
    control.owed[index:] = kept
    return True


def _with_owed(cursor: Any, execute: Any) -> None:
    """Run ``execute`` on ``cursor``, preceded in the same round trip by the statements its connection owes."""
    if isinstance(cursor, psycopg.ServerCursor):  # psycopg's pipeline mode does not take server-side cursors
        _send_owed(cursor.connection)
        execute()
    else:
        _send_owed(cursor.connection, then=execute)


def _send_owed(connection: Any, then: Any = None) -> None:
    """Send what ``connection`` owes, then run ``then`` (if given) in the same pipeline; just ``then`` if it owes
    nothing."""
    control = _control(connection)
    if not control.owed:
        if then is not None:
            then()
        return
    owed, control.owed = control.owed, []
    with connection.pipeline():
        helper = connection.cursor()
        for item in owed:
            _execute(helper, item)
        if then is not None:
            then()


def _execute(cursor: Any, item: bytes | tuple[str, Any]) -> None:
    if isinstance(item, tuple):
        cursor.execute(*item)
    else:
        cursor.execute(item)


def defer_write(connection: Any, sql: str, parameters: Any) -> None:
    """Owe the server ``sql`` (a write nothing reads the result of) in the transaction open on ``connection``: it
    goes with the transaction's next statement, in its round trip, or with its COMMIT. A rollback first drops it,
    as it would undo it. Its error, if any, is then that statement's or the commit's."""
    _control(connection).owed.append((sql, parameters))


def register() -> None:
    """Make ``postgresql+psycopg_piggyback://`` URLs load this dialect."""
    registry.register(f"postgresql.{DRIVER}", __name__, PiggybackDialect.__name__)
