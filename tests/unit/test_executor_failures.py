"""Every executor kind, failing at each of its stages: the failure callback runs once, the error is
stored, and the steps after the failing one never run."""

from __future__ import annotations

import pytest

from jobs.executors import (
    InstanceCreateExecutor,
    InstanceDeleteExecutor,
    InstanceResizeExecutor,
    InstanceUpdateExecutor,
)
from resources.backends import SimulatedConfig
from resources.db import session_scope
from resources.models import Instance, Operation
from resources.states import State
from tests.fixtures import RECORDER, drain, make_instance, make_tenant

EXECUTORS = {
    "create": (InstanceCreateExecutor, {}),
    "update": (InstanceUpdateExecutor, {"updated_fields": ["name"]}),
    "resize": (InstanceResizeExecutor, {"flavor": "large"}),
    "delete": (InstanceDeleteExecutor, {}),
}

# (executor, failing cloud call, a step after it that must never run: (actor, resource type, first argument))
CASES = [
    ("create", "volume.create", ("backend_method", "instance", "create")),
    ("create", "instance.create", ("poll_runtime_state", "instance", "ACTIVE")),
    ("create", "instance.boot", ("state_transition", "instance", "set_ok")),
    ("update", "instance.update", ("poll_runtime_state", "instance", "ACTIVE")),
    ("update", "instance.pull", ("state_transition", "instance", "set_ok")),
    ("resize", "instance.resize", ("poll_runtime_state", "instance", "ACTIVE")),
    ("resize", "instance.pull", ("state_transition", "instance", "set_ok")),
    ("delete", "instance.delete", ("poll_backend_check", "instance", "is_gone")),
    ("delete", "instance.is_gone", ("backend_method", "volume", "delete")),
    ("delete", "volume.delete", ("delete_resource", "instance")),
]


def _existing_ok_instance(broker):
    instance = make_instance(make_tenant(), volumes=2)
    InstanceCreateExecutor.execute(instance)
    drain(broker)
    RECORDER.reset()
    with session_scope() as session:
        return session.get(Instance, instance.id)


@pytest.mark.parametrize(("kind", "failing", "never"), CASES, ids=[f"{k}-{f}" for k, f, _ in CASES])
def test_failure_at_each_stage(stub_broker, stub_worker, cloud, kind, failing, never):
    # Given an instance with volumes (created already, unless the create is under test)
    executor, kwargs = EXECUTORS[kind]
    instance = make_instance(make_tenant(), volumes=2) if kind == "create" else _existing_ok_instance(stub_broker)
    # ... and a cloud where one call of the operation fails for good
    cloud.configure(SimulatedConfig(build_ms=40, delete_ms=20, failures={failing: 1.0}))

    # When the operation runs
    handle = executor.execute(instance, **kwargs)
    drain(stub_broker)

    # Then it failed once, with the error stored on the operation and the resource
    with session_scope() as session:
        operation = session.get(Operation, handle.id)
        erred = session.get(Instance, instance.id)
        assert operation.status == "failed"
        assert erred.state == State.ERRED
        assert erred.error_message == operation.error_message
        assert failing in erred.error_message or "runtime state" in erred.error_message
        assert erred.error_traceback
        assert erred.action == ""
    assert RECORDER.count_call("error_state_transition", instance.ref) == 1
    # ... no success callback ran, and the step after the failing one never ran
    assert RECORDER.count_call("state_transition", instance.ref, "set_ok") == 0
    actor, resource_type, *args = never
    later = [
        (a, call)
        for a, call in RECORDER.calls
        if a == actor and call[0].startswith(f"{resource_type}:") and list(call[1 : 1 + len(args)]) == args
    ]
    assert later == [], f"{never} ran after {failing} failed"


@pytest.mark.parametrize("kind", ["update", "resize", "delete"])
def test_success_with_retried_polls_runs_no_failure_callback(stub_broker, stub_worker, cloud, kind):
    # Given an OK instance, and a cloud whose objects take a while to settle (so polls retry)
    instance = _existing_ok_instance(stub_broker)
    cloud.configure(SimulatedConfig(build_ms=80, delete_ms=80))
    executor, kwargs = EXECUTORS[kind]

    # When the operation runs
    handle = executor.execute(instance, **kwargs)
    drain(stub_broker)

    # Then it succeeded after retried polls, and no failure callback ran
    assert handle.status() == "succeeded"
    polls = RECORDER.count_call("poll_runtime_state", instance.ref) + RECORDER.count_call(
        "poll_backend_check", instance.ref
    )
    assert polls > 1
    assert RECORDER.count_call("error_state_transition") == 0
