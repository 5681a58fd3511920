"""A step whose resource no longer exists ends its operation with a clear error, without retries."""

from __future__ import annotations

from sqlalchemy import delete

from jobs.executors import InstanceCreateExecutor
from resources.db import session_scope
from resources.models import Instance, Operation
from tests.fixtures import RECORDER, drain, make_instance, make_tenant


def test_deleted_resource_fails_the_operation_once(stub_broker, cloud, request):
    # Given a create that is queued, and its instance row deleted before any worker picks it up
    instance = make_instance(make_tenant(), volumes=0)
    handle = InstanceCreateExecutor.execute(instance)
    with session_scope() as session:
        session.execute(delete(Instance).where(Instance.id == instance.id))

    # When a worker runs it
    request.getfixturevalue("stub_worker")
    drain(stub_broker)

    # Then the operation failed once with a message naming the resource, and nothing was retried
    with session_scope() as session:
        operation = session.get(Operation, handle.id)
        assert operation.status == "failed"
        assert f"Instance {instance.uuid[:8]}… no longer exists" in operation.error_message
    assert RECORDER.count("state_transition", instance.ref) == 1
    assert RECORDER.count("error_state_transition", instance.ref) == 1
