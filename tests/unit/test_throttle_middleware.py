"""The throttle inside the executors and middleware, on a StubBroker with in-process workers."""

from __future__ import annotations

import uuid

import pytest
from dramatiq import Worker
from sqlalchemy import select, update

from jobs.actors import state_transition
from jobs.broker import broker as project_broker
from jobs.executors import InstanceCreateExecutor
from jobs.executors.throttling import provisioning_scope
from middleware import Throttle, find_throttle
from middleware.throttle import ThrottleStore
from resources.backends import SimulatedConfig
from resources.config import get_settings
from resources.db import session_scope
from resources.errors import ConfigurationError
from resources.models import Instance, Operation, ServiceSettings
from resources.redis_client import get_redis
from resources.states import State
from tests.fixtures import RECORDER, drain, make_instance, make_tenant

LIMIT_OPTION = "max_concurrent_provision_instance"


def _state(instance):
    with session_scope() as session:
        return session.scalars(select(Instance.state).where(Instance.uuid == instance.uuid)).one()


def _scope(instance):
    with session_scope() as session:
        return provisioning_scope(session.get(Instance, instance.id)).key


def _explain(instance):
    return find_throttle(project_broker).store.explain(_scope(instance))


def test_operations_over_the_limit_wait_in_scheduled_state_then_run_in_order(stub_broker, cloud):
    # Given a tenant allowing one provisioning at a time, and three instances
    tenant = make_tenant(options={LIMIT_OPTION: 1})
    instances = [make_instance(tenant, name=f"vm{i}", volumes=0) for i in range(3)]

    # When all three are created (no worker running yet)
    handles = [InstanceCreateExecutor.execute(instance) for instance in instances]

    # Then only the first one's messages were sent; the others wait outside the broker, still scheduled
    assert stub_broker.queues["default"].qsize() == 1
    explanation = _explain(instances[0])
    assert [h.operation_id for h in explanation.holders] == [handles[0].id]
    assert [w.operation_id for w in explanation.waiters] == [handles[1].id, handles[2].id]
    assert all(_state(i) == State.CREATION_SCHEDULED for i in instances)

    # When workers run
    worker = Worker(stub_broker, worker_timeout=20, worker_threads=4)
    worker.start()
    try:
        drain(stub_broker)
    finally:
        worker.stop()

    # Then all were created, one after another in arrival order, and no slot is left held
    assert [_state(i) for i in instances] == [State.OK] * 3
    begun = [args[0] for actor, args in RECORDER.calls if actor == "state_transition" and args[1] == "begin_creating"]
    assert begun == [i.ref for i in instances]
    explanation = _explain(instances[0])
    assert explanation.holders == [] and explanation.waiters == []


def test_cancelling_a_waiting_operation_gives_up_its_place(stub_broker, stub_worker, cloud):
    # Given one provisioning running and another waiting for its slot
    tenant = make_tenant(options={LIMIT_OPTION: 1})
    cloud.configure(SimulatedConfig(build_ms=300))
    first, second, third = (make_instance(tenant, name=f"vm{i}", volumes=0) for i in range(3))
    InstanceCreateExecutor.execute(first)
    waiting = InstanceCreateExecutor.execute(second)
    InstanceCreateExecutor.execute(third)

    # When the waiting one is cancelled
    assert waiting.cancel("no longer needed") is True
    drain(stub_broker)

    # Then it never ran, its resource shows why, and the next one in line ran in its place
    assert waiting.cancel() is False
    with session_scope() as session:
        assert session.get(Operation, waiting.id).status == "cancelled"
        cancelled = session.scalars(select(Instance).where(Instance.uuid == second.uuid)).one()
        assert (cancelled.state, cancelled.error_message) == (State.ERRED, "no longer needed")
    assert RECORDER.count_call("state_transition", second.ref, "begin_creating") == 0
    assert (_state(first), _state(third)) == (State.OK, State.OK)


def test_a_bad_limit_in_service_settings_is_refused_when_configured():
    with pytest.raises(ConfigurationError, match=f"{LIMIT_OPTION} of service settings 'tenant'.*positive integer"):
        ServiceSettings(name="tenant", options={LIMIT_OPTION: 0})


def test_a_bad_limit_written_behind_the_models_back_fails_execute_and_queues_nothing(stub_broker):
    # Given a tenant whose limit was set to a string directly in the database
    tenant = make_tenant()
    instance = make_instance(tenant, volumes=0)
    with session_scope() as session:
        session.execute(
            update(ServiceSettings).where(ServiceSettings.id == tenant.id).values(options={LIMIT_OPTION: "4"})
        )

    # When an instance is created, then the error names the option, value and fix
    with pytest.raises(ConfigurationError, match=f"{LIMIT_OPTION}.*'4'.*positive integer"):
        InstanceCreateExecutor.execute(instance)

    # And nothing was queued or changed
    assert stub_broker.queues["default"].qsize() == 0
    assert _state(instance) == State.CREATION_SCHEDULED


@pytest.mark.parametrize("value", ["0", "-2", "four", "2.5"])
def test_a_bad_default_limit_is_a_start_up_error(monkeypatch, value):
    monkeypatch.setenv("JOBS_THROTTLE_DEFAULT_LIMIT", value)
    with pytest.raises(ConfigurationError, match="JOBS_THROTTLE_DEFAULT_LIMIT"):
        get_settings()


def test_a_heartbeat_longer_than_the_lease_is_a_start_up_error(monkeypatch):
    monkeypatch.setenv("JOBS_THROTTLE_HEARTBEAT_S", "10")
    monkeypatch.setenv("JOBS_THROTTLE_LEASE_S", "5")
    with pytest.raises(ConfigurationError, match="JOBS_THROTTLE_HEARTBEAT_S"):
        get_settings()


def test_the_heartbeat_resends_a_hand_off_that_was_lost(stub_broker, monkeypatch):
    # Given a throttle whose hand-offs time out at once, and an operation granted a slot whose first
    # step was never sent (its sender died between the grant and the send)
    monkeypatch.setenv("JOBS_THROTTLE_HANDOFF_TIMEOUT_S", "0.001")
    throttle = Throttle(get_settings())
    prefix = f"{get_settings().namespace}:throttle-test:{uuid.uuid4().hex[:6]}"
    throttle._store = ThrottleStore(get_redis(), prefix, lease_ms=10_000, handoff_timeout_ms=1)
    tenant = make_tenant(options={LIMIT_OPTION: 1})
    instance = make_instance(tenant, volumes=0)
    with session_scope() as session:
        scope = provisioning_scope(session.get(Instance, instance.id))
    message = state_transition.message(instance.ref, "begin_creating")
    # (granted at a test-clock time long past: its hand-off timeout has certainly run out by now)
    throttle.store.acquire("op", [scope], start=False, messages=[(0, message.encode().decode())], now_ms=1000)

    # When a heartbeat runs after the hand-off timeout
    throttle.beat(stub_broker)

    # Then the first step was sent again
    assert stub_broker.queues["default"].qsize() == 1


def test_with_the_throttle_off_nothing_waits(stub_broker, monkeypatch):
    # Given the throttle switched off, and a tenant allowing one provisioning at a time
    monkeypatch.setenv("JOBS_THROTTLE", "off")
    throttle = Throttle(get_settings())
    tenant = make_tenant(options={LIMIT_OPTION: 1})
    instances = [make_instance(tenant, name=f"vm{i}", volumes=0) for i in range(3)]
    monkeypatch.setattr(
        project_broker, "middleware", [throttle if isinstance(m, Throttle) else m for m in project_broker.middleware]
    )

    # When three are created, then all three start at once
    for instance in instances:
        InstanceCreateExecutor.execute(instance)
    assert stub_broker.queues["default"].qsize() == 3
