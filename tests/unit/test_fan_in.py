"""A group's next stage runs exactly once, even when a member is delivered twice."""

from __future__ import annotations

import logging
import threading

import pytest
from dramatiq.middleware import Middleware
from sqlalchemy import event, select

import middleware.transitions
from jobs.executors import InstanceCreateExecutor
from middleware.plan import OPTION_NODE, step_paths
from middleware.progress import complete_step, first_steps
from resources.db import get_engine, read_scope, session_scope
from resources.models import Instance, Operation, StepDone
from resources.quick_statements import QuickStatements
from resources.states import State
from tests.fixtures import RECORDER, drain, make_instance, make_tenant


class RedeliverVolumeCallbacks(Middleware):
    """Enqueues every volume's last step a second time, as the broker does after a lost ack."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def after_enqueue(self, broker, message, delay):
        resource = message.options.get("resource", "")
        if message.actor_name != "state_transition" or not resource.startswith("volume:"):
            return
        with self.lock:
            if message.message_id in self.seen:
                return
            self.seen.add(message.message_id)
        broker.enqueue(message.copy())


def test_group_fan_in_fires_once_with_redelivered_members(stub_broker, unchained, stub_worker, cloud):
    # Given an instance with three volumes, and a broker that delivers each volume's last step twice
    instance = make_instance(make_tenant(), volumes=3)
    redeliver = RedeliverVolumeCallbacks()
    stub_broker.add_middleware(redeliver)
    try:
        # When it is created
        InstanceCreateExecutor.execute(instance)
        drain(stub_broker)
    finally:
        stub_broker.middleware.remove(redeliver)

    # Then the duplicates were delivered, yet the stage after the group ran exactly once
    assert len(redeliver.seen) == 3
    assert RECORDER.count("state_transition") >= 3 + 1 + 1
    assert RECORDER.count("backend_method", instance.ref) == 1
    assert cloud.creates_made("instance") == 1
    with session_scope() as session:
        assert session.scalars(select(Instance.state).where(Instance.uuid == instance.uuid)).one() == State.OK


def test_completing_the_same_step_twice_moves_on_once(stub_broker):
    # Given an operation whose first step is being completed (no worker consumes in this test)
    instance = make_instance(make_tenant(), volumes=0)
    handle = InstanceCreateExecutor.execute(instance)
    with session_scope() as session:
        plan = session.get(Operation, handle.id).plan
    path = first_steps(plan)[0].message.options[OPTION_NODE]

    # When the completion is recorded twice (two deliveries that both ran)
    with session_scope() as session:
        first = complete_step(session, handle.id, path)
    with session_scope() as session:
        second = complete_step(session, handle.id, path)

    # Then only the first moves the operation on
    assert len(first.outgoing) == 1
    assert second.outgoing == []


def test_the_last_record_leaves_an_operation_loaded_in_the_session_current(stub_broker):
    # Given an operation, loaded as an object by the session that records the step (a sync-mode
    # caller's session, or a step's own work, may hold it)
    instance = make_instance(make_tenant(), volumes=0)
    handle = InstanceCreateExecutor.execute(instance)
    with session_scope() as session:
        operation = session.get(Operation, handle.id)
        steps = [item.message.options[OPTION_NODE] for item in first_steps(operation.plan)]
        assert operation.status == "running"

        # When its steps are recorded in that session, the last one ending it
        while steps:
            progress = complete_step(session, handle.id, steps.pop())
            steps.extend(item.message.options[OPTION_NODE] for item in progress.outgoing)

        # Then the object shows the end, not the status it was loaded with
        assert progress.ended
        assert (operation.status, operation.finished_at is not None) == ("succeeded", True)


class StatusWhenLogged(logging.Handler):
    """Reads, from a connection of its own, the status of each operation whose success is being logged."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().endswith("succeeded"):
            operation_id = record.args[0]  # type: ignore[index]
            with read_scope() as session:
                self.seen.append(session.scalars(select(Operation.status).where(Operation.id == operation_id)).one())


def test_an_operations_success_is_logged_once_committed(stub_broker, stub_worker, cloud):
    # Given a reader that looks at the operation the moment its success is logged
    handler = StatusWhenLogged()
    logger = logging.getLogger("middleware.progress")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        # When an operation runs to its end
        handle = InstanceCreateExecutor.execute(make_instance(make_tenant(), volumes=1))
        drain(stub_broker)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    # Then the line came after the commit, not while the transaction (on SQLite, holding the one writer lock that
    # every other writer waits for) was still open
    assert handle.status() == "succeeded"
    assert handler.seen == ["succeeded"]


def test_on_postgresql_an_operations_last_step_is_recorded_in_one_statement(stub_broker, stub_worker, cloud):
    # Given a worker counting the statements the database gets while the operation's last step is recorded
    if get_engine().dialect.name != "postgresql":
        pytest.skip("one statement is PostgreSQL's way; SQLite's writers take turns at BEGIN")
    statements: list[str] = []
    recording = threading.Event()

    def count(conn, cursor, statement, parameters, context, executemany):
        if recording.is_set() and statement.lstrip().upper().startswith(("WITH", "UPDATE", "INSERT")):
            statements.append(statement)

    real_finish = middleware.transitions.finish_without_session

    def finish_watched(*args, **kwargs):
        recording.set()
        try:
            return real_finish(*args, **kwargs)
        finally:
            recording.clear()

    real_execute = QuickStatements.execute

    def execute_counted(self, statement, parameters):  # statements on a pooled driver connection, no events
        if recording.is_set():
            statements.append(str(statement.compile(dialect=get_engine().dialect)))
        return real_execute(self, statement, parameters)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(middleware.transitions, "finish_without_session", finish_watched)
            patch.setattr(QuickStatements, "execute", execute_counted)
            # When an operation runs to its end (its steps chained, marked, recorded at the end)
            handle = InstanceCreateExecutor.execute(make_instance(make_tenant(), volumes=0))
            drain(stub_broker)
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)

    # Then it succeeded, its every step is in the database, and the record was one statement
    assert handle.status() == "succeeded"
    with read_scope() as session:
        plan = session.get(Operation, handle.id).plan
        recorded = set(session.scalars(select(StepDone.path).where(StepDone.operation_id == handle.id)))
    assert set(step_paths(plan["root"])) <= recorded
    assert len(statements) == 1 and statements[0].lstrip().upper().startswith("WITH")
