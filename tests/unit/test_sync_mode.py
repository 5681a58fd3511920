"""is_async=False runs the operation in-process with the same semantics, and re-raises the error."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from jobs.executors import InstanceCreateExecutor, InstanceDeleteExecutor
from resources.backends import SimulatedConfig
from resources.db import session_scope
from resources.errors import BackendError
from resources.models import Instance, Operation, Volume
from resources.states import State
from tests.fixtures import RECORDER, make_instance, make_tenant


def test_sync_create_and_delete(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=2)

    handle = InstanceCreateExecutor.execute(instance, is_async=False)

    with session_scope() as session:
        loaded = session.get(Instance, instance.id)
        assert (loaded.state, loaded.runtime_state) == (State.OK, "ACTIVE")
        assert [v.state for v in loaded.volumes] == [State.OK, State.OK]
        assert session.get(Operation, handle.id).status == "succeeded"
    assert RECORDER.processed == []  # nothing went through the broker

    InstanceDeleteExecutor.execute(instance, is_async=False)
    with session_scope() as session:
        assert session.get(Instance, instance.id) is None
        assert session.scalars(select(Volume)).all() == []


def test_sync_failure_runs_the_failure_callback_once_and_reraises(stub_broker, cloud):
    # Given a cloud that refuses to create instances
    cloud.configure(SimulatedConfig(build_ms=10, failures={"instance.create": 1.0}))
    instance = make_instance(make_tenant(), volumes=1)

    # When it is created in sync mode, inside the caller's session, which keeps what happened
    with session_scope() as session, pytest.raises(BackendError, match="injected failure"):
        InstanceCreateExecutor.execute(session.get(Instance, instance.id), is_async=False)

    # Then the error is stored, the instance and its unfinished volume are ERRED, and no later step ran
    with session_scope() as session:
        loaded = session.get(Instance, instance.id)
        assert loaded.state == State.ERRED
        assert "injected failure" in loaded.error_message
        assert "BackendError" in loaded.error_traceback
        assert [v.state for v in loaded.volumes] == [State.OK]  # its part finished before the failure
    assert cloud.creates_made("instance") == 0


def test_sync_mode_joins_the_callers_transaction(stub_broker, cloud):
    # Given an instance, and a caller working inside a transaction block
    instance = make_instance(make_tenant(), volumes=1)

    with session_scope() as session:
        loaded = session.get(Instance, instance.id)
        # When it is created in sync mode
        InstanceCreateExecutor.execute(loaded, is_async=False)
        # Then the caller's objects already show the result, and the caller may go on in the same block
        assert loaded.state == State.OK
        loaded.name = "renamed"

    with session_scope() as session:
        assert (session.get(Instance, instance.id).state, session.get(Instance, instance.id).name) == (
            State.OK,
            "renamed",
        )


def test_sync_mode_rolls_back_with_the_caller(stub_broker, cloud):
    # Given a caller whose transaction will roll back after a sync operation failed
    cloud.configure(SimulatedConfig(build_ms=10, failures={"instance.create": 1.0}))
    instance = make_instance(make_tenant(), volumes=0)

    with pytest.raises(BackendError), session_scope() as session:
        InstanceCreateExecutor.execute(session.get(Instance, instance.id), is_async=False)

    # Then nothing of the operation is left half-applied: no operation row, the state as before
    with session_scope() as session:
        assert session.get(Instance, instance.id).state == State.CREATION_SCHEDULED
        assert session.scalars(select(Operation)).all() == []
