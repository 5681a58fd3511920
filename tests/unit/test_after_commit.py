"""execute() inside a session sends nothing until commit, and nothing at all on rollback."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from jobs.executors import InstanceCreateExecutor, InstanceResizeExecutor
from resources.db import get_sessionmaker, session_scope
from resources.models import Instance, Operation
from resources.states import State
from tests.fixtures import drain, make_instance, make_tenant


def _queued(broker) -> int:
    return sum(queue.qsize() for queue in broker.queues.values())


def _ok_instance(broker):
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance)
    drain(broker)
    return instance


def test_commit_sends_and_not_before(stub_broker):
    # Given an instance in CREATION_SCHEDULED, and no worker running
    instance = make_instance(make_tenant(), volumes=1)

    with get_sessionmaker()() as session:
        loaded = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        # When it is executed inside the caller's transaction
        InstanceCreateExecutor.execute(loaded)
        # Then nothing is sent before the commit
        assert _queued(stub_broker) == 0
        session.commit()

    # ... and the first step is sent once it commits
    assert _queued(stub_broker) == 1


def test_rollback_sends_nothing_and_undoes_the_scheduled_state(stub_broker, stub_worker, cloud):
    # Given an OK instance
    instance = _ok_instance(stub_broker)

    # When a resize is executed and the caller's transaction rolls back
    with get_sessionmaker()() as session:
        loaded = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        InstanceResizeExecutor.execute(loaded, flavor="large")
        assert loaded.state == State.UPDATE_SCHEDULED
        session.rollback()
    drain(stub_broker)

    # Then nothing ran, the state is back to OK, and there is no operation record
    with session_scope() as session:
        reloaded = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        assert (reloaded.state, reloaded.flavor, reloaded.action) == (State.OK, "small", "")
        assert session.scalar(select(func.count()).select_from(Operation)) == 1  # the create only


def test_savepoint_rollback_drops_only_its_messages(stub_broker):
    # Given two instances to create in one transaction, the second inside a savepoint
    tenant = make_tenant()
    first, second = make_instance(tenant, "a", volumes=0), make_instance(tenant, "b", volumes=0)

    with get_sessionmaker()() as session:
        InstanceCreateExecutor.execute(session.get(Instance, first.id))
        with pytest.raises(RuntimeError), session.begin_nested():
            InstanceCreateExecutor.execute(session.get(Instance, second.id))
            raise RuntimeError("the caller changes its mind")
        session.commit()

    # Then only the first operation's message was sent
    assert _queued(stub_broker) == 1
    with session_scope() as session:
        assert session.get(Instance, second.id).operation_id is None


def test_outside_a_transaction_it_sends_at_once(stub_broker):
    # Given a detached instance (its session is closed)
    instance = make_instance(make_tenant(), volumes=0)

    # When it is executed
    handle = InstanceCreateExecutor.execute(instance)

    # Then the operation is committed and its first message sent
    assert _queued(stub_broker) == 1
    with session_scope() as session:
        assert session.get(Instance, instance.id).operation_id == handle.id


def test_a_released_savepoint_sends_nothing_before_the_outer_commit(stub_broker):
    # Given an operation executed in a transaction, then a savepoint released in the same transaction
    tenant = make_tenant()
    first, second = make_instance(tenant, "a", volumes=0), make_instance(tenant, "b", volumes=0)
    with get_sessionmaker()() as session:
        InstanceCreateExecutor.execute(session.get(Instance, first.id))
        with session.begin_nested():
            InstanceCreateExecutor.execute(session.get(Instance, second.id))
        # Then nothing is sent yet (SQLAlchemy reports a savepoint's release as a commit)
        assert _queued(stub_broker) == 0
        session.commit()
    assert _queued(stub_broker) == 2
