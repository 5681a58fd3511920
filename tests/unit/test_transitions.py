"""The state machine: compare-and-set transitions, operation guards and clear errors."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
from sqlalchemy import select

from jobs.actors import state_transition
from middleware import StepContext, step_context
from resources.db import session_scope
from resources.errors import ResourceNotFound, TransitionNotAllowed
from resources.models import Instance, new_uuid
from resources.states import State
from resources.transitions import apply_transition, claim_for_operation
from tests.fixtures import make_instance, make_tenant


def _state(instance):
    with session_scope() as session:
        loaded = session.scalars(select(Instance).where(Instance.uuid == instance.uuid)).one()
        return loaded.state, loaded.operation_id, loaded.error_message


def _set(instance, **values):
    with session_scope() as session:
        loaded = session.get(Instance, instance.id)
        for key, value in values.items():
            setattr(loaded, key, value)


def test_illegal_transition_names_resource_state_and_transition(database):
    instance = make_instance(make_tenant(), volumes=0)
    _set(instance, state=State.DELETING)

    with pytest.raises(TransitionNotAllowed) as error, session_scope() as session:
        apply_transition(session, instance.ref, "begin_updating")

    assert str(error.value) == f"Instance {instance.uuid[:8]}… is DELETING; begin_updating needs UPDATE_SCHEDULED"


def test_unknown_transition_and_missing_resource_are_clear(database):
    instance = make_instance(make_tenant(), volumes=0)
    with pytest.raises(ValueError, match="unknown transition 'explode'; use one of"), session_scope() as session:
        apply_transition(session, instance.ref, "explode")
    with pytest.raises(ResourceNotFound, match="no longer exists"), session_scope() as session:
        apply_transition(session, f"instance:{new_uuid()}", "set_ok")


def test_leaving_erred_clears_the_error(database):
    instance = make_instance(make_tenant(), volumes=0)
    _set(instance, state=State.ERRED, error_message="boom", error_traceback="tb")

    with session_scope() as session:
        apply_transition(session, instance.ref, "recover")

    assert _state(instance) == (State.OK, None, "")


def test_entering_erred_keeps_the_error(database):
    instance = make_instance(make_tenant(), volumes=0)
    _set(instance, state=State.CREATING, error_message="boom")
    with session_scope() as session:
        apply_transition(session, instance.ref, "set_erred")
    assert _state(instance)[2] == "boom"


def test_two_writers_cannot_both_win(database):
    # Given an OK instance and eight threads that each try to schedule an update with their own operation
    instance = make_instance(make_tenant(), volumes=0)
    _set(instance, state=State.OK)
    barrier = threading.Barrier(8)
    winners, losers = [], []

    def contend() -> None:
        operation = new_uuid()
        barrier.wait()
        try:
            with session_scope() as session:
                apply_transition(session, instance.ref, "schedule_updating", operation_id=operation)
            winners.append(operation)
        except TransitionNotAllowed:
            losers.append(operation)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then exactly one won, and its operation is the one stamped on the resource
    assert len(winners) == 1 and len(losers) == 7
    assert _state(instance)[:2] == (State.UPDATE_SCHEDULED, winners[0])


def test_late_callback_of_an_old_operation_changes_nothing(database, caplog):
    # Given an instance now owned by a newer operation, in UPDATING
    instance = make_instance(make_tenant(), volumes=0)
    old, new = new_uuid(), new_uuid()
    _set(instance, state=State.UPDATING, operation_id=new)

    # When the old operation's success and failure callbacks arrive late
    with caplog.at_level(logging.WARNING), step_context(StepContext(old, None, instance.ref, 0)):
        state_transition.fn(instance.ref, "set_ok")
        state_transition.fn(instance.ref, "set_erred")

    # Then nothing changed, and the log says why
    assert _state(instance)[:2] == (State.UPDATING, new)
    assert f"late set_ok of operation {old} ignored" in caplog.text


def test_duplicate_begin_of_the_same_operation_is_a_no_op(database):
    instance = make_instance(make_tenant(), volumes=0)
    operation = new_uuid()
    with session_scope() as session:
        claim_for_operation(session, instance.ref, operation, expected=State.CREATION_SCHEDULED)
    for _ in range(2):
        with session_scope() as session:
            apply_transition(session, instance.ref, "begin_creating", operation_id=operation)
    assert _state(instance)[:2] == (State.CREATING, operation)


def test_a_create_runs_once(database):
    instance = make_instance(make_tenant(), volumes=0)
    with session_scope() as session:
        claim_for_operation(session, instance.ref, new_uuid(), expected=State.CREATION_SCHEDULED)
    with pytest.raises(TransitionNotAllowed, match="already belongs to operation"), session_scope() as session:
        claim_for_operation(session, instance.ref, new_uuid(), expected=State.CREATION_SCHEDULED)


def test_a_step_context_with_a_fence_keeps_every_other_field():
    context = StepContext("op", "0.1", "instance:x", 2, callback="failure")
    assert context.with_fence(7) == dataclasses.replace(context, throttle_fence=7)
    assert context.with_fence(7).with_fence(None) == context
