"""SQLite through pysqlite, with SAVEPOINT and RELEASE SAVEPOINT run by the driver itself, as the text they are.

SQLAlchemy's default dialect runs each savepoint statement as a clause, compiled anew every time (a savepoint's
compiled form is not cached as other statements' are), and then through a Connection's execution: its events, a
cursor, a result object. ``execute()`` opens a savepoint in its caller's transaction and releases it, so every
operation paid for that twice: in cProfile of a calling thread, an eighth of ``execute()``'s own time. Here
SAVEPOINT and RELEASE SAVEPOINT go straight to the driver connection, as the "begin" hook's BEGIN does
(``resources.db``): like the statements of ``pg_piggyback``, they skip SQLAlchemy's cursor events and echo (SQLite's
trace callback still sees them), and a driver error is raised as SQLAlchemy's, as a Connection raises it. ROLLBACK
TO SAVEPOINT, an error path, still goes through the Connection. ``sqlite://`` and ``sqlite+pysqlite://`` URLs load
this dialect (``resources.db``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.exc import DBAPIError

__all__ = ["DRIVER", "SavepointTextDialect", "register"]

#: The driver name in ``sqlite+<driver>://`` URLs that load this dialect.
DRIVER = "pysqlite_savepoints"


class SavepointTextDialect(SQLiteDialect_pysqlite):
    """``sqlite+pysqlite`` whose savepoint statements are sent as text, not compiled on every use."""

    supports_statement_cache = True

    def do_savepoint(self, connection: Any, name: str) -> None:
        self._run_on_driver(connection, f"SAVEPOINT {self._savepoint_name(name)}")

    def do_release_savepoint(self, connection: Any, name: str) -> None:
        self._run_on_driver(connection, f"RELEASE SAVEPOINT {self._savepoint_name(name)}")

    def do_rollback_to_savepoint(self, connection: Any, name: str) -> None:
        connection.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {self._savepoint_name(name)}")

    def _savepoint_name(self, name: str) -> str:
        return self.identifier_preparer.format_savepoint(None, name)

    def _run_on_driver(self, connection: Any, sql: str) -> None:
        try:
            connection.connection.driver_connection.execute(sql)
        except self.loaded_dbapi.Error as error:
            raise DBAPIError.instance(sql, (), error, self.loaded_dbapi.Error, dialect=self) from error


def register() -> None:
    """Make ``sqlite+pysqlite_savepoints://`` URLs load this dialect."""
    registry.register(f"sqlite.{DRIVER}", __name__, SavepointTextDialect.__name__)
