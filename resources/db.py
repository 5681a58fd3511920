"""Engine and sessions, one engine per process and database URL."""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, exc, inspect, make_url
from sqlalchemy.orm import Session, sessionmaker

from . import pg_piggyback, sqlite_savepoints
from .config import get_settings
from .errors import ConfigurationError
from .json_columns import serialize_json
from .models import Base
from .sqlite_turns import TurnTakingConnection

__all__ = [
    "create_schema",
    "drop_schema",
    "get_engine",
    "get_sessionmaker",
    "join_session",
    "joined_session",
    "migrate",
    "read_scope",
    "session_scope",
]

#: How long a SQLite writer waits for another writer's lock, seconds.
SQLITE_BUSY_TIMEOUT_S = 60
#: Execution option of connections that only read (see ``read_scope``).
_READ_ONLY = "jobs_read_only"
#: A pooled connection back in the pool for longer than this is pinged before its next use (see
#: ``ping_idle_connections``).
PING_AFTER_IDLE_S = 1.0
#: In a pooled connection's ``info``: when it was last returned to the pool (``time.monotonic``).
_RETURNED_AT = "jobs_returned_at"


def _prepare_sqlite(engine: Engine, url: str) -> None:
    database = engine.url.database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see the "begin" hook).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL survives any crash of the process (a killed worker loses nothing it committed);
        # only a power cut can lose the last commits. FULL would fsync on every commit, twice per step.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # SQLite has no SELECT ... FOR UPDATE. Taking the write lock at BEGIN makes every transaction
        # serializable, so a read-then-write (a compare-and-set, a fan-in count) can never be stale.
        # A read-only transaction needs no lock: in WAL mode it reads the last commit, beside a writer.
        driver_connection = connection.connection.driver_connection
        if connection.get_execution_options().get(_READ_ONLY):
            driver_connection.execute("BEGIN")  # the driver's own: a statement through SQLAlchemy costs ~20 µs more
            return
        if isinstance(driver_connection, TurnTakingConnection):
            driver_connection.begin_write()  # queues behind the other writers (see resources.sqlite_turns)
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def ping_idle_connections(engine: Engine, idle_s: float = PING_AFTER_IDLE_S) -> None:
    """Ping a pooled connection before its use only when it has sat in the pool for ``idle_s`` or more; a
    dead one is replaced, and every connection pooled before it with it (a dead idle connection most likely
    means the server restarted), as ``pool_pre_ping`` does.

    ``pool_pre_ping`` pings before every use: on a busy worker about four database round trips more per
    operation, for connections that were in use a moment ago. A connection killed while it sat unused (a
    server's idle timeout, a restart in a quiet spell) is caught by the ping as before. A restart under load
    fails the statements of the connections in use, as it does with pre-ping; the first failure invalidates
    the pool, and workers retry such errors (``middleware.transient``). SQLAlchemy has no such window, hence
    these two pool events (the idea of HikariCP's ``aliveBypassWindowMs``)."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        returned_at = record.info.get(_RETURNED_AT)
        if returned_at is None or time.monotonic() - returned_at < idle_s:
            return  # new (its info goes with a replaced connection), or in use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as error:
            # The pool tries a new connection on this error (and raises the connect's error if that fails).
            raise exc.InvalidatePoolError(f"a pooled connection idle for {idle_s}s or more is dead: {error}") from error


# Both pools hand out the connection returned last (``pool_use_lifo``): a thread that commits and starts again gets
# its own connection back, warm. Handed the pool's oldest one instead (its default), a thread took turns over every
# pooled connection: on SQLite each had missed the others' commits and read its pages again, about twenty reads
# of the file per execute(); on PostgreSQL each had its own server process and prepared statements to warm up.
@functools.cache
def _engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            _with_savepoint_text(url),
            connect_args={
                "timeout": SQLITE_BUSY_TIMEOUT_S,
                "check_same_thread": False,
                "factory": TurnTakingConnection,
            },
            json_serializer=serialize_json,
            pool_use_lifo=True,
        )
        _prepare_sqlite(engine, url)
        return engine
    engine = create_engine(
        _with_piggyback(url), pool_size=10, max_overflow=20, pool_use_lifo=True, json_serializer=serialize_json
    )
    ping_idle_connections(engine)
    return engine


def _with_piggyback(url: str) -> URL:
    """psycopg URLs load the dialect that sends BEGIN and savepoints with the next statement (``pg_piggyback``)."""
    parsed = make_url(url)
    if parsed.drivername != "postgresql+psycopg":
        return parsed
    pg_piggyback.register()
    return parsed.set(drivername=f"postgresql+{pg_piggyback.DRIVER}")


def _with_savepoint_text(url: str) -> URL:
    """pysqlite URLs load the dialect that sends savepoint statements as text (``sqlite_savepoints``)."""
    parsed = make_url(url)
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
        return parsed
    sqlite_savepoints.register()
    return parsed.set(drivername=f"sqlite+{sqlite_savepoints.DRIVER}")


def get_engine(url: str | None = None) -> Engine:
    return _engine_for(url or get_settings().database_url)


@functools.cache
def _sessionmaker_for(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=_engine_for(url), expire_on_commit=False)


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    return _sessionmaker_for(url or get_settings().database_url)


#: A caller's session that ``session_scope()`` joins instead of opening its own (sync-mode executors).
_JOINED: contextvars.ContextVar[Session | None] = contextvars.ContextVar("joined_session", default=None)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session whose transaction commits when the block ends and rolls back on an exception.

    Inside ``join_session(s)``, it is a savepoint of ``s`` instead: the work becomes part of the
    caller's transaction, committed or rolled back with it.
    """
    joined = _JOINED.get()
    if joined is not None and url is None:
        with joined.begin_nested():
            yield joined
        return
    with get_sessionmaker(url).begin() as session:
        yield session


@contextmanager
def read_scope(url: str | None = None) -> Iterator[Session]:
    """A session for reading only; nothing it changes is kept. On SQLite it does not queue for the
    write lock behind writers, so a check before every step stays cheap under load."""
    joined = _JOINED.get()
    if joined is not None and url is None:
        yield joined
        return
    with get_sessionmaker(url)() as session:
        session.connection(execution_options={_READ_ONLY: True})
        try:
            yield session
        finally:
            session.rollback()


def joined_session() -> Session | None:
    """The caller's session that ``session_scope`` and the reads join (see ``join_session``), if any."""
    return _JOINED.get()


@contextmanager
def join_session(session: Session) -> Iterator[Session]:
    """Make ``session_scope()`` in this thread use ``session`` (a ContextVar: threads don't share it)."""
    token = _JOINED.set(session)
    try:
        yield session
    finally:
        _JOINED.reset(token)


def migrate(url: str | None = None) -> str | None:
    """Upgrade the database to the newest migration; return the revision it is at then.

    A database that ``create_all`` made before there were migrations (0001_initial's tables, no revision
    recorded) is first stamped at 0001_initial, so the upgrade starts from what it has. All of it runs in
    one transaction.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    from .migrations import INITIAL_REVISION, INITIAL_TABLES, alembic_config, migration_connection

    config = alembic_config(url)
    with migration_connection(url) as connection:
        config.attributes["connection"] = connection
        if MigrationContext.configure(connection).get_current_revision() is None:
            present = INITIAL_TABLES & set(inspect(connection).get_table_names())
            if present == INITIAL_TABLES:
                command.stamp(config, INITIAL_REVISION)
            elif present:
                # Neither empty nor what create_all made: guessing its revision could lose data.
                raise ConfigurationError(
                    f"the database has some of the tables ({', '.join(sorted(present))}) but records no "
                    f"migration; it lacks {', '.join(sorted(INITIAL_TABLES - present))}. Point DATABASE_URL "
                    "at an empty database or one this project created"
                )
        command.upgrade(config, "head")
        return MigrationContext.configure(connection).get_current_revision()


def create_schema(url: str | None = None) -> None:
    """Create the tables straight from the models, skipping the migrations: quick, for tests. The database
    records no revision; ``migrate`` adopts it only while the models are still those of 0001_initial."""
    Base.metadata.create_all(get_engine(url))


def drop_schema(url: str | None = None) -> None:
    Base.metadata.drop_all(get_engine(url))
