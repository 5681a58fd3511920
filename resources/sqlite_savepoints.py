"""SQLite through pysqlite, with SAVEPOINT, RELEASE SAVEPOINT and ROLLBACK TO SAVEPOINT sent as the text they are.

SQLAlchemy's default dialect runs each of them as a clause, and compiles that clause anew every time: a
savepoint's compiled form is not cached as other statements' are. ``execute()`` opens a savepoint in its caller's
transaction and releases it, so every operation paid for two compilations, about a twentieth of what
``execute()`` costs the process that calls it. Here the statements go through ``exec_driver_sql``, which still
runs the connection's events and logging. ``sqlite://`` and ``sqlite+pysqlite://`` URLs load this dialect
(``resources.db``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

__all__ = ["DRIVER", "SavepointTextDialect", "register"]

#: The driver name in ``sqlite+<driver>://`` URLs that load this dialect.
DRIVER = "pysqlite_savepoints"


class SavepointTextDialect(SQLiteDialect_pysqlite):
    """``sqlite+pysqlite`` whose savepoint statements are sent as text, not compiled on every use."""

    supports_statement_cache = True

    def do_savepoint(self, connection: Any, name: str) -> None:
        connection.exec_driver_sql(f"SAVEPOINT {self._savepoint_name(name)}")

    def do_release_savepoint(self, connection: Any, name: str) -> None:
        connection.exec_driver_sql(f"RELEASE SAVEPOINT {self._savepoint_name(name)}")

    def do_rollback_to_savepoint(self, connection: Any, name: str) -> None:
        connection.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {self._savepoint_name(name)}")

    def _savepoint_name(self, name: str) -> str:
        return self.identifier_preparer.format_savepoint(None, name)


def register() -> None:
    """Make ``sqlite+pysqlite_savepoints://`` URLs load this dialect."""
    registry.register(f"sqlite.{DRIVER}", __name__, SavepointTextDialect.__name__)
