"""Bad input to execute() is refused with an error naming the thing and the fix, before anything is
written or sent: the caller's transaction is left exactly as it was, whatever the caller does next."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.actors import backend_method
from jobs.executors import InstanceCreateExecutor, InstanceResizeExecutor, InstanceUpdateExecutor
from jobs.executors.standard import UpdateExecutor
from middleware.plan import node_at, step_paths
from resources.db import get_engine, session_scope
from resources.errors import InvalidArgument, JobsError, TransitionNotAllowed
from resources.models import Instance, Operation, OutboxMessage, Resource
from resources.states import State
from tests.fixtures import drain, make_instance, make_tenant


class _LeakyExecutor(UpdateExecutor):
    """Puts a Python object into a step's arguments: only found while building, after pre_apply ran."""

    @classmethod
    def get_task_signature(cls, instance: Instance, serialized_instance: str, **kwargs: Any) -> Any:
        return backend_method.message(serialized_instance, "update", updated_fields=[], when=datetime.date.today())


def nothing_written(instance: Instance, state: State) -> None:
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Operation)) == 0
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
        after = session.scalars(select(Instance).where(Instance.id == instance.id)).one()
        assert (after.state, after.operation_id) == (state, None)


def ok_instance(broker: Any) -> Instance:
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance)
    drain(broker)
    with session_scope() as session:
        loaded = session.get_one(Instance, instance.id)
        loaded.operation_id = None  # as if created long ago: "nothing written" then means no new operation
        session.execute(Operation.__table__.delete())
    return loaded


def test_a_non_json_option_is_refused_naming_it(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    with pytest.raises(InvalidArgument) as raised:
        InstanceCreateExecutor.execute(instance, interval_s=object())
    message = str(raised.value)
    assert "option 'interval_s' of InstanceCreateExecutor.execute()" in message
    assert "not JSON" in message and "pass JSON values" in message
    nothing_written(instance, State.CREATION_SCHEDULED)
    assert stub_broker.queues["default"].qsize() == 0


def test_a_non_json_step_argument_undoes_pre_apply_even_if_the_caller_commits(stub_broker, stub_worker, cloud):
    instance = ok_instance(stub_broker)
    # When the executor's work turns out to carry a date object, after pre_apply scheduled the update, and
    # the caller catches the error and commits its transaction anyway
    with session_scope() as session, pytest.raises(InvalidArgument) as raised:
        _LeakyExecutor.execute(session.get_one(Instance, instance.id))
    assert "argument 'when' of backend_method is date" in str(raised.value)
    # Then pre_apply's transition was undone with everything else
    nothing_written(instance, State.OK)


class _ClashingExecutor(InstanceUpdateExecutor):
    """Its pre_apply leaves a pending row that the database refuses (an instance with another one's uuid): the
    error comes at the flush before the operation's own rows are written, inside execute()'s savepoint."""

    @classmethod
    def pre_apply(cls, instance: Resource, *, session: Session, operation_id: str, **kwargs: Any) -> None:
        super().pre_apply(instance, session=session, operation_id=operation_id, **kwargs)
        session.add(Instance(name="clash", uuid=instance.uuid, service_settings_id=instance.service_settings_id))


def test_a_row_pre_apply_left_that_the_database_refuses_undoes_the_whole_operation(stub_broker, stub_worker, cloud):
    instance = ok_instance(stub_broker)
    # When the flush of pre_apply's pending row fails, and the caller catches the error and commits anyway
    with session_scope() as session, pytest.raises(IntegrityError):
        _ClashingExecutor.execute(session.get_one(Instance, instance.id))
    # Then nothing of the operation was written: no operation row, no outbox row, no transition
    nothing_written(instance, State.OK)
    assert stub_broker.queues["default"].qsize() == 0


def test_an_unknown_option_is_refused_listing_the_ones_it_takes(stub_broker, stub_worker, cloud):
    instance = ok_instance(stub_broker)
    with pytest.raises(InvalidArgument) as raised:
        InstanceResizeExecutor.execute(instance, flavor="large", flavr="huge")
    message = str(raised.value)
    assert "InstanceResizeExecutor.execute() got unknown option(s) 'flavr'" in message
    assert "it takes: action, action_details, attempts, flavor, interval_s" in message
    assert "InstanceResizeExecutor.options" in message
    nothing_written(instance, State.OK)


def test_a_missing_required_option_is_refused(stub_broker, stub_worker, cloud):
    instance = ok_instance(stub_broker)
    with pytest.raises(InvalidArgument, match=r"missing option\(s\) \['flavor'\]"):
        InstanceResizeExecutor.execute(instance)
    nothing_written(instance, State.OK)


def test_an_oversized_payload_is_refused_with_the_limit_and_the_fix(stub_broker, stub_worker, cloud, monkeypatch):
    monkeypatch.setenv("JOBS_MAX_MESSAGE_BYTES", "4096")
    instance = ok_instance(stub_broker)
    with pytest.raises(InvalidArgument) as raised:
        InstanceUpdateExecutor.execute(instance, updated_fields=["x" * 5000])
    message = str(raised.value)
    assert "backend_method would be" in message and "JOBS_MAX_MESSAGE_BYTES=4096" in message
    assert "pass a reference" in message
    nothing_written(instance, State.OK)


def test_an_illegal_transition_is_refused_and_nothing_is_written(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=0)  # still CREATION_SCHEDULED: it cannot be resized
    with pytest.raises(TransitionNotAllowed, match="CREATION_SCHEDULED; schedule_updating needs"):
        InstanceResizeExecutor.execute(instance, flavor="large")
    nothing_written(instance, State.CREATION_SCHEDULED)


def test_a_deleted_resource_is_refused_naming_it(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    with session_scope() as session:
        session.delete(session.get_one(Instance, instance.id))
    with pytest.raises(JobsError, match=f"Instance {instance.uuid} is not in the database") as raised:
        InstanceCreateExecutor.execute(instance)
    assert stub_broker.queues["default"].qsize() == 0
    # ... and the transaction execute() opened to look for it is over, though the error (its frames) is still held
    assert raised.value is not None and get_engine().pool.checkedout() == 0


class _ManyStepsExecutor(UpdateExecutor):
    """Ten steps of about 1 KB each: the plan is over a 4 KB limit, every message under it."""

    @classmethod
    def get_task_signature(cls, instance: Instance, serialized_instance: str, **kwargs: Any) -> Any:
        return [backend_method.message(serialized_instance, "pull", updated_fields=["x" * 1000]) for _ in range(10)]


def test_a_plan_larger_than_a_message_may_be_is_accepted_when_each_message_fits(
    stub_broker, stub_worker, cloud, monkeypatch
):
    # The limit is a message's, checked message by message; the plan's one encoding only spares those checks
    monkeypatch.setenv("JOBS_MAX_MESSAGE_BYTES", "4096")
    instance = ok_instance(stub_broker)
    handle = _ManyStepsExecutor.execute(instance)
    drain(stub_broker)
    with session_scope() as session:
        plan = session.get_one(Operation, handle.id).plan
    pulls = [p for p in step_paths(plan["root"]) if node_at(plan["root"], p)["message"]["args"][1] == "pull"]
    assert len(pulls) == 10


class _LeakyFailureExecutor(InstanceUpdateExecutor):
    """Its failure callback carries a Python object: a message of the plan that is not a step."""

    @classmethod
    def get_failure_signature(cls, instance: Instance, serialized_instance: str, **kwargs: Any) -> Any:
        return backend_method.message(serialized_instance, "update", updated_fields=[], when=datetime.date.today())


def test_a_non_json_argument_of_a_failure_callback_is_refused_naming_it(stub_broker, stub_worker, cloud):
    instance = ok_instance(stub_broker)
    with pytest.raises(InvalidArgument, match="argument 'when' of backend_method is date"):
        _LeakyFailureExecutor.execute(instance)
    nothing_written(instance, State.OK)
