"""Executors on a StubBroker with in-process workers, a real SQL database and the simulated cloud."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from jobs.executors import (
    InstanceCreateExecutor,
    InstanceDeleteExecutor,
    InstanceResizeExecutor,
    InstanceUpdateExecutor,
)
from resources.backends import SimulatedConfig
from resources.db import session_scope
from resources.models import Instance, Operation, Volume
from resources.states import State
from tests.fixtures import RECORDER, drain, make_instance, make_tenant


def _load(model, uuid):
    with session_scope() as session:
        return session.scalars(select(model).where(model.uuid == uuid)).one_or_none()


def _volumes(instance):
    with session_scope() as session:
        return list(session.scalars(select(Volume).where(Volume.instance_id == instance.id).order_by(Volume.id)))


def test_create_with_volumes_succeeds(stub_broker, stub_worker, cloud):
    # Given an instance with two volumes in CREATION_SCHEDULED
    instance = make_instance(make_tenant(), volumes=2)

    # When it is created
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)

    # Then it and its volumes are OK, linked to their backend objects, and the operation succeeded
    created = _load(Instance, instance.uuid)
    assert created.state == State.OK
    assert created.runtime_state == "ACTIVE"
    assert created.backend_id
    assert created.operation_id == handle.id
    assert [v.state for v in _volumes(instance)] == [State.OK, State.OK]
    assert all(v.runtime_state == "available" and v.operation_id == handle.id for v in _volumes(instance))
    assert handle.status() == "succeeded"
    # ... polls were retried while the objects were building, and no failure callback ran
    assert RECORDER.count("poll_runtime_state", instance.ref) > 1
    assert RECORDER.count("error_state_transition") == 0
    assert cloud.creates_made("instance") == 1
    assert cloud.creates_made("volume") == 2


@pytest.mark.parametrize(
    ("failing", "instance_creates"),
    [("volume.create", 0), ("instance.create", 0), ("instance.boot", 1)],
)
def test_failure_at_each_stage(stub_broker, stub_worker, cloud, failing, instance_creates):
    # Given a cloud where one stage of the instance's creation fails for good
    cloud.configure(SimulatedConfig(build_ms=40, failures={failing: 1.0}))
    instance = make_instance(make_tenant(), volumes=2)

    # When it is created
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)

    # Then the failure callback ran once, the error is stored, and no later step ran
    erred = _load(Instance, instance.uuid)
    assert erred.state == State.ERRED
    assert erred.error_message
    assert erred.error_traceback
    assert RECORDER.count("error_state_transition", instance.ref) == 1
    assert RECORDER.count("state_transition", instance.ref) == 1  # begin_creating only, never set_ok
    assert cloud.creates_made("instance") == instance_creates
    with session_scope() as session:
        operation = session.get(Operation, handle.id)
        assert operation.status == "failed"
        assert operation.error_message == erred.error_message
    if failing == "instance.boot":
        assert "reached runtime state 'ERROR'" in erred.error_message
    else:
        assert "injected failure" in erred.error_message


def test_resize_runs_on_heavy_queue_and_clears_action(stub_broker, stub_worker, cloud):
    # Given an OK instance
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    RECORDER.reset()

    # When it is resized
    with session_scope() as session:
        scheduled = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        InstanceResizeExecutor.execute(scheduled, flavor="large")
    drain(stub_broker)

    # Then the action was shown while scheduled, the resize ran on the heavy queue, and the action is cleared
    assert scheduled.state == State.UPDATE_SCHEDULED
    assert scheduled.action == "resize"
    assert scheduled.action_details == {"flavor": "large"}
    resized = _load(Instance, instance.uuid)
    assert (resized.state, resized.flavor, resized.action, resized.action_details) == (State.OK, "large", "", {})
    assert [q for a, q, _r, _ok in RECORDER.processed if a == "heavy_backend_method"] == ["heavy"]
    assert RECORDER.queues_used()["default"] > 0


def test_heavy_task_sends_every_message_to_heavy(stub_broker, stub_worker, cloud):
    # Given an instance whose first step will fail, so the failure callback runs too
    cloud.configure(SimulatedConfig(build_ms=40, failures={"instance.create": 1.0}))
    instance = make_instance(make_tenant(), volumes=2)

    # When it is created as a heavy task
    InstanceCreateExecutor.execute(instance, is_heavy_task=True)
    drain(stub_broker)

    # Then every message of the operation, callbacks included, ran on the heavy queue
    assert set(RECORDER.queues_used()) == {"heavy"}
    assert RECORDER.count("error_state_transition", instance.ref) == 1


def test_update_pushes_fields(stub_broker, stub_worker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance)
    drain(stub_broker)

    with session_scope() as session:
        loaded = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        loaded.name = "renamed"
        InstanceUpdateExecutor.execute(loaded, updated_fields=["name"])
    drain(stub_broker)

    updated = _load(Instance, instance.uuid)
    assert updated.state == State.OK
    assert cloud.object(updated.backend_id)["name"] == '"renamed"'


def test_delete_with_nested_volume_executors(stub_broker, stub_worker, cloud):
    # Given an OK instance with two volumes
    instance = make_instance(make_tenant(), volumes=2)
    InstanceCreateExecutor.execute(instance)
    drain(stub_broker)

    # When it is deleted (each volume's delete executor is a stage of the instance's)
    with session_scope() as session:
        loaded = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        InstanceDeleteExecutor.execute(loaded)
        volume_states = [v.state for v in loaded.volumes]
    drain(stub_broker)

    # Then the nested executors' pre_apply ran in the same transaction, and every row is gone
    assert volume_states == [State.DELETION_SCHEDULED, State.DELETION_SCHEDULED]
    assert _load(Instance, instance.uuid) is None
    assert _volumes(instance) == []


def test_nested_failure_marks_the_failing_volume_and_the_instance(stub_broker, stub_worker, cloud):
    # Given an OK instance with volumes, and a cloud that refuses to delete volumes
    instance = make_instance(make_tenant(), volumes=2)
    InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    cloud.configure(SimulatedConfig(build_ms=40, delete_ms=20, failures={"volume.delete": 1.0}))

    # When it is deleted
    InstanceDeleteExecutor.execute(_load(Instance, instance.uuid))
    drain(stub_broker)

    # Then the instance and its volumes are ERRED with the error, nothing is left in a transitional state
    erred = _load(Instance, instance.uuid)
    assert erred.state == State.ERRED
    assert "volume.delete" in erred.error_message
    volumes = _volumes(instance)
    assert [v.state for v in volumes] == [State.ERRED, State.ERRED]
    assert all("volume.delete" in v.error_message for v in volumes)


def test_force_delete_removes_the_row_even_on_failure(stub_broker, stub_worker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    cloud.configure(SimulatedConfig(build_ms=40, failures={"instance.delete": 1.0}))

    handle = InstanceDeleteExecutor.execute(_load(Instance, instance.uuid), force=True)
    drain(stub_broker)

    assert handle.status() == "failed"
    assert _load(Instance, instance.uuid) is None


def test_polls_give_up_after_their_attempts(stub_broker, stub_worker, cloud):
    # Given a cloud where instances take far longer to build than the poll will wait
    cloud.configure(SimulatedConfig(build_ms=600_000))
    instance = make_instance(make_tenant(), "slow", volumes=0)

    # When it is created with polls of three attempts
    handle = InstanceCreateExecutor.execute(instance, attempts=3, interval_s=0.01)
    drain(stub_broker)

    # Then the poll ran exactly three times and the error says what it waited for
    assert RECORDER.count("poll_runtime_state", instance.ref) == 3
    erred = _load(Instance, instance.uuid)
    assert erred.state == State.ERRED
    assert erred.error_message == (
        f"Instance 'slow' ({instance.uuid[:8]}…) still 'BUILD' after 3 polls every 0.01 s; expected 'ACTIVE'"
    )
    assert handle.status() == "failed"
