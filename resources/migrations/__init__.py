"""The schema's history as Alembic migrations (``versions/``), run by :func:`resources.db.migrate`.

``alembic.ini`` beside this file holds Alembic's settings for the application and for developers'
``alembic -c resources/migrations/alembic.ini ...`` commands alike; ``env.py`` connects both the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic.config import Config
from sqlalchemy import Connection, text

from ..config import get_settings
from ..db import get_engine

__all__ = ["INITIAL_REVISION", "INITIAL_TABLES", "MIGRATIONS_DIR", "alembic_config", "migration_connection"]

MIGRATIONS_DIR = Path(__file__).resolve().parent
INITIAL_REVISION = "0001_initial"
#: The tables 0001_initial creates: what ``create_all`` made before there were migrations.
INITIAL_TABLES = frozenset({"service_settings", "instances", "volumes", "operations", "operation_steps_done", "outbox"})
#: Key of the PostgreSQL advisory lock that makes concurrent runs of the migrations take turns.
_LOCK_KEY = 0x6A6F6273


def alembic_config(url: str | None = None) -> Config:
    """Alembic's settings for the database at ``url`` (default: DATABASE_URL's)."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    # The logging sections are for the alembic command; the application's logging stays as it is.
    config.attributes["configure_logger"] = False
    # The file's values go through ConfigParser's interpolation: a percent-encoded password needs '%%'.
    config.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return config


@contextmanager
def migration_connection(url: str | None = None) -> Iterator[Connection]:
    """A connection in one transaction for a whole run of migrations: PostgreSQL and SQLite (whose
    transactions this project begins itself, see ``resources.db``) both roll DDL back, so a run that
    fails leaves the schema as it found it."""
    engine = get_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # Batch migrations copy a table, drop the old one and rename the copy; with foreign keys
            # enforced, that drop deletes (ON DELETE CASCADE) or refuses to drop rows that refer to it.
            # The pragma does nothing inside a transaction, so it goes to the driver before one begins.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    # Two releases at once (a rolling deploy) take turns rather than both creating tables.
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
                yield connection
                if sqlite:
                    dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if dangling:
                        raise RuntimeError(f"the migrations left rows whose foreign keys point nowhere: {dangling[:5]}")
        finally:
            if sqlite:
                # Not back to the pool with foreign keys off: the pool's next connection turns them on.
                connection.invalidate()
