"""The reads before and after every step run on a pooled driver connection (``resources.quick_statements``): the same
answers as through a SQLAlchemy Connection, no transaction left open, the connection back in the pool."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import exc as sql_errors

from middleware.progress import _CHECK, _RECORDED_PATHS, _STATUS_AND_RECORD
from middleware.transient import is_transient
from resources.db import get_engine, join_session, session_scope
from resources.models import Operation, OperationStatus, StepDone
from resources.quick_statements import QuickStatements, quick_reads, quick_write
from tests.fixtures import wait_for

PLAN = {"root": {"kind": "seq", "children": []}, "parties": [], "throttle": [["scope", 4]]}


def _operation(status: str = OperationStatus.RUNNING, done: tuple[str, ...] = ()) -> str:
    with session_scope() as session:
        operation = Operation(executor="Probe", resource_ref="instance:1", status=status, plan=PLAN)
        session.add(operation)
        session.flush()
        session.add_all(StepDone(operation_id=operation.id, path=path) for path in done)
        return operation.id


def _through_a_connection(statement: Any, parameters: dict[str, Any]) -> Any:
    with get_engine().connect() as connection:
        return connection.execute(statement, parameters).one_or_none()


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize("done", [(), ("0",)])
def test_a_read_answers_as_it_does_through_a_connection(done: tuple[str, ...]) -> None:
    operation_id = _operation(done=done)
    parameters = {"operation_id": operation_id, "path": "0"}

    with quick_reads() as reader:
        assert isinstance(reader, QuickStatements)
        check = reader.execute(_CHECK, parameters).one_or_none()
        status = reader.execute(_STATUS_AND_RECORD, parameters).one_or_none()
        paths = reader.scalars(_RECORDED_PATHS, {"operation_id": operation_id})

    assert check is not None and tuple(check) == tuple(_through_a_connection(_CHECK, parameters))
    assert check == (OperationStatus.RUNNING, bool(done), PLAN)  # the plan decoded, the flag a bool
    assert status is not None and tuple(status) == tuple(_through_a_connection(_STATUS_AND_RECORD, parameters))
    assert paths == list(done)


@pytest.mark.usefixtures("database")
def test_a_missing_row_reads_as_none() -> None:
    with quick_reads() as reader:
        assert reader.execute(_CHECK, {"operation_id": "nothing-here", "path": "0"}).one_or_none() is None


@pytest.mark.usefixtures("database")
def test_a_read_leaves_no_transaction_open_and_the_connection_back_in_the_pool() -> None:
    operation_id = _operation()
    pool = get_engine().pool
    before = pool.checkedout()

    with quick_reads() as reader:
        reader.execute(_CHECK, {"operation_id": operation_id, "path": "0"})
        assert pool.checkedout() == before + 1
    assert pool.checkedout() == before

    # A writer can end the operation at once: the read took no lock and holds no snapshot.
    with session_scope() as session:
        session.get(Operation, operation_id).status = OperationStatus.SUCCEEDED  # type: ignore[union-attr]
    with quick_reads() as reader:
        row = reader.execute(_STATUS_AND_RECORD, {"operation_id": operation_id, "path": "0"}).one_or_none()
    assert row is not None and row[0] == OperationStatus.SUCCEEDED


@pytest.mark.usefixtures("database")
def test_the_connection_goes_back_to_the_pool_when_a_read_fails() -> None:
    pool = get_engine().pool
    before = pool.checkedout()
    with pytest.raises(Exception, match="path"), quick_reads() as reader:  # the driver's own error
        reader.execute(_CHECK, {"operation_id": "x"})  # no "path"
    assert pool.checkedout() == before


@pytest.mark.usefixtures("database")
def test_a_driver_error_is_raised_as_sqlalchemys() -> None:
    missing = Table("no_such_table", MetaData(), Column("id", String, primary_key=True))
    with quick_reads() as reader, pytest.raises(sql_errors.DBAPIError, match="no_such_table"):
        reader.execute(select(missing.c.id).where(missing.c.id == bindparam("id")), {"id": "x"})


def test_a_connection_the_server_dropped_fails_as_transient_and_leaves_the_pool() -> None:
    if get_engine().dialect.name != "postgresql":
        pytest.skip("needs a server that can drop a connection: DATABASE_URL=postgresql://…")
    engine = create_engine(get_engine().url, pool_size=1, max_overflow=0)  # one connection, never pinged
    backend = select(func.pg_backend_pid())

    def read_pid() -> int:
        pooled = engine.raw_connection()
        try:
            return QuickStatements(engine.dialect, pooled).scalars(backend, {})[0]
        finally:
            pooled.close()

    try:
        pid = read_pid()
        with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            gone = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            wait_for(lambda: admin.execute(gone, {"pid": pid}).scalar_one() == 0, timeout_s=30)
        with pytest.raises(sql_errors.OperationalError) as raised:
            read_pid()  # the pool's one connection, dropped by the server
        assert is_transient(raised.value) and raised.value.connection_invalidated
        assert read_pid() != pid  # the next read gets a live connection
    finally:
        engine.dispose()


@pytest.mark.usefixtures("database")
def test_inside_a_joined_session_the_reads_see_its_transaction() -> None:
    with session_scope() as session, join_session(session):
        operation = Operation(executor="Probe", resource_ref="instance:1", plan=PLAN)
        session.add(operation)
        session.flush()  # not committed
        with quick_reads() as reader:
            assert reader is session
            row = reader.execute(_CHECK, {"operation_id": operation.id, "path": "0"}).one_or_none()
        assert row is not None


@pytest.mark.usefixtures("database")
def test_parameters_are_converted_by_their_types_as_through_a_connection() -> None:
    operation_id = _operation()
    cutoff = select(Operation.id).where(Operation.created_at < bindparam("cutoff", type_=DateTime))
    later = {"cutoff": datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)}
    with quick_reads() as reader:
        assert reader.scalars(cutoff, later) == [operation_id]
        assert reader.scalars(cutoff, {"cutoff": datetime(2000, 1, 1)}) == []


@pytest.mark.usefixtures("database")
def test_a_statement_with_parameters_rendered_at_execution_is_refused_with_the_way_out() -> None:
    listed = select(Operation.id).where(Operation.id.in_(bindparam("ids", expanding=True)))
    with quick_reads() as reader, pytest.raises(TypeError, match="run it through a Connection"):
        reader.execute(listed, {"ids": ["a", "b"]})


@pytest.mark.usefixtures("database")
def test_a_quick_write_commits_its_block_or_rolls_it_back() -> None:
    operation_id = _operation()
    finish = update(Operation).where(Operation.id == bindparam("operation_id")).values(status=OperationStatus.SUCCEEDED)
    if get_engine().dialect.name != "sqlite":
        with quick_write() as statements:
            assert statements is None  # PostgreSQL's last record is one autocommitted statement instead
        return
    with pytest.raises(RuntimeError, match="on purpose"), quick_write() as statements:
        assert statements is not None
        statements.execute(finish, {"operation_id": operation_id})
        raise RuntimeError("on purpose")
    with session_scope() as session:
        assert session.get(Operation, operation_id).status == OperationStatus.RUNNING  # type: ignore[union-attr]

    with quick_write() as statements:
        assert statements is not None
        ended = statements.execute(finish.returning(Operation.created_at), {"operation_id": operation_id})
        (created_at,) = ended.one_or_none() or (None,)
        assert isinstance(created_at, datetime)  # converted by the column's type, not the driver's text
        rows = [{"operation_id": operation_id, "path": path, "done_at": datetime(2026, 1, 1)} for path in "01"]
        statements.executemany(insert(StepDone), rows)
    with session_scope() as session:
        assert session.get(Operation, operation_id).status == OperationStatus.SUCCEEDED  # type: ignore[union-attr]
        assert session.get(StepDone, (operation_id, "1")).done_at == datetime(2026, 1, 1)  # type: ignore[union-attr]
        stored = session.execute(text("SELECT done_at FROM operation_steps_done WHERE path = '1'")).scalar_one()
    assert stored == "2026-01-01 00:00:00.000000"  # as SQLAlchemy stores it, not as the driver would
