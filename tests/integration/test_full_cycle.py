"""A full create → action → delete cycle through real dramatiq worker processes on a real Redis,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid

import dramatiq
import pytest
from sqlalchemy import select

from jobs.broker import build_broker
from jobs.executors import InstanceCreateExecutor, InstanceDeleteExecutor, InstanceResizeExecutor
from jobs.processes import start_worker, stop_all
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.db import session_scope
from resources.models import Instance, Operation, Volume
from resources.states import State
from tests.conftest import SQLITE_INTEGRATION_URL
from tests.fixtures import make_instance, make_tenant, reset_database, wait_for

pytestmark = pytest.mark.integration


def _databases() -> list:
    configured = os.environ.get("DATABASE_URL", "")
    postgres = configured if configured.startswith(("postgres", "postgresql")) else None
    return [
        # The SQLite variant runs when DATABASE_URL is unset (as a new user, and CI's RabbitMQ run): with a
        # PostgreSQL URL it would repeat that run on another Redis server, where CI's time is short.
        pytest.param(
            SQLITE_INTEGRATION_URL,
            id="sqlite",
            marks=pytest.mark.skipif(postgres is not None, reason="DATABASE_URL is PostgreSQL; unset it for SQLite"),
        ),
        pytest.param(
            postgres,
            id="postgresql",
            marks=pytest.mark.skipif(postgres is None, reason="set DATABASE_URL to a PostgreSQL database to run this"),
        ),
    ]


@pytest.fixture(params=_databases())
def live_system(request, monkeypatch, tmp_path):
    """Real workers (default and heavy) on the real Redis, sharing one database with this process."""
    monkeypatch.setenv("DATABASE_URL", request.param)
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("JOBS_POLL_INTERVAL_S", "0.1")
    monkeypatch.delenv("JOBS_BROKER")
    reset_database()
    cloud = SimulatedCloud()
    cloud.configure(SimulatedConfig(latency_ms=(5, 30), build_ms=200, delete_ms=100, seed=1))
    previous = dramatiq.get_broker()
    dramatiq.set_broker(build_broker())
    workers = [
        start_worker("worker", queues=["default"], threads=4, log_path=tmp_path / "worker.log"),
        start_worker("heavy", queues=["heavy"], threads=1, prefetch=1, log_path=tmp_path / "heavy.log"),
    ]
    try:
        yield cloud
    finally:
        stop_all(workers)
        dramatiq.set_broker(previous)
        cloud.reset()


def _instances(uuids):
    with session_scope() as session:
        return {i.uuid: i for i in session.scalars(select(Instance).where(Instance.uuid.in_(uuids)))}


def _ended(handles):
    with session_scope() as session:
        statuses = session.scalars(select(Operation.status).where(Operation.id.in_([h.id for h in handles])))
        return all(status != "running" for status in statuses)


def _settled(uuids):
    return all(i.state in (State.OK, State.ERRED) for i in _instances(uuids).values())


def test_create_action_delete_cycle(live_system):
    # Given three instances with two volumes each
    tenant = make_tenant()
    instances = [make_instance(tenant, f"vm-{i}", volumes=2) for i in range(3)]
    uuids = [i.uuid for i in instances]

    # When they are created through the executors
    handles = [InstanceCreateExecutor.execute(i) for i in instances]
    wait_for(lambda: _ended(handles) and _settled(uuids), timeout_s=120)

    # Then all are OK with their volumes
    assert [h.status() for h in handles] == ["succeeded"] * 3
    created = _instances(uuids)
    assert [(created[u].state, created[u].runtime_state) for u in uuids] == [(State.OK, "ACTIVE")] * 3
    with session_scope() as session:
        volumes = session.scalars(select(Volume).where(Volume.instance_id.in_([i.id for i in instances])))
        assert [v.state for v in volumes] == [State.OK] * 6

    # When two are resized (the resize step runs on the heavy queue, which only the heavy worker serves)
    with session_scope() as session:
        resizes = [InstanceResizeExecutor.execute(session.get(Instance, i.id), flavor="large") for i in instances[:2]]
    wait_for(lambda: _ended(resizes) and _settled(uuids), timeout_s=120)

    # Then they are OK, resized, and their action is cleared
    resized = _instances(uuids)
    for instance in instances[:2]:
        current = resized[instance.uuid]
        assert (current.state, current.flavor, current.action) == (State.OK, "large", "")

    # When all are deleted (each volume's delete executor is a stage of its instance's)
    with session_scope() as session:
        deletes = [InstanceDeleteExecutor.execute(session.get(Instance, i.id)) for i in instances]
    wait_for(lambda: _ended(deletes) and _instances(uuids) == {}, timeout_s=120)

    # Then every row is gone
    assert [h.status() for h in deletes] == ["succeeded"] * 3
    with session_scope() as session:
        assert session.scalars(select(Volume)).all() == []


def test_a_failing_step_errs_the_resource_with_a_readable_message(live_system):
    # Given a cloud whose instances never boot
    cloud = live_system
    cloud.configure(
        SimulatedConfig(latency_ms=(5, 30), build_ms=200, delete_ms=100, seed=1, failures={"instance.boot": 1.0})
    )
    instance = make_instance(make_tenant(), "never-boots", volumes=1)

    # When it is created
    handle = InstanceCreateExecutor.execute(instance)
    wait_for(lambda: _ended([handle]) and _settled([instance.uuid]), timeout_s=120)

    # Then it is ERRED with the poll's error and traceback, and its volume (whose part finished) is OK
    erred = _instances([instance.uuid])[instance.uuid]
    assert erred.state == State.ERRED
    assert "reached runtime state 'ERROR' while waiting for 'ACTIVE'" in erred.error_message
    assert "PollFailed" in erred.error_traceback
    with session_scope() as session:
        assert [v.state for v in session.scalars(select(Volume).where(Volume.instance_id == instance.id))] == [State.OK]
