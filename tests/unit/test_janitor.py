"""The janitor: every transitional state is rescued once its operation is gone, and only then."""

from __future__ import annotations

from datetime import timedelta

import pytest
from dramatiq import Message
from sqlalchemy import select, update

from jobs.executors import InstanceCreateExecutor, InstanceUpdateExecutor
from jobs.redis_broker import JobsRedisBroker
from middleware import Copy, find_inflight, find_throttle
from middleware.plan import OPTION_NODE, OPTION_OPERATION
from resources.db import session_scope
from resources.models import Instance, Operation, OperationStatus, utcnow
from resources.states import TRANSITIONAL_STATES, State
from scheduler.janitor import is_alive, sweep
from tests.fixtures import forget_guards, make_instance, make_tenant

HOURS_AGO_4 = timedelta(hours=4)


def stuck_instance(state: State, *, operation_age: timedelta, row_age: timedelta = timedelta(0)) -> Instance:
    """An instance in ``state`` whose operation started ``operation_age`` ago and has no message left."""
    instance = make_instance(make_tenant(), volumes=0)
    with session_scope() as session:
        operation = Operation(
            executor="test",
            resource_ref=instance.ref,
            plan={"parties": [{"ref": instance.ref, "path": None, "on_failure": []}]},
            created_at=utcnow() - operation_age,
        )
        session.add(operation)
        session.flush()
        session.execute(
            update(Instance)
            .where(Instance.id == instance.id)
            .values(state=state, operation_id=operation.id, modified_at=utcnow() - row_age)
        )
    return instance


def load(instance: Instance) -> Instance:
    with session_scope() as session:
        return session.scalars(select(Instance).where(Instance.id == instance.id)).one()


def operation_status(instance: Instance) -> str:
    with session_scope() as session:
        return session.scalars(select(Operation.status).where(Operation.id == load(instance).operation_id)).one()


@pytest.mark.parametrize("state", sorted(TRANSITIONAL_STATES))
def test_a_resource_stuck_in_any_transitional_state_is_moved_to_erred(stub_broker, state):
    # Given a resource in a transitional state whose operation started 4 hours ago and left nothing behind
    instance = stuck_instance(state, operation_age=HOURS_AGO_4)

    # When the janitor runs
    rescued = sweep(stub_broker)

    # Then it is ERRED with a message naming the state and how long it was stuck; its operation failed
    assert [s.ref for s in rescued] == [instance.ref]
    after = load(instance)
    assert after.state == State.ERRED
    assert f"Stuck in {state} for 4 h 0 min" in after.error_message
    assert operation_status(instance) == OperationStatus.FAILED


@pytest.mark.parametrize("state", sorted(TRANSITIONAL_STATES))
def test_the_timeout_counts_from_the_operations_start_not_the_rows_last_save(stub_broker, state):
    # Given a row untouched for days whose operation started a minute ago
    instance = stuck_instance(state, operation_age=timedelta(minutes=1), row_age=timedelta(days=3))

    # Then the janitor leaves it alone
    assert sweep(stub_broker) == []
    assert load(instance).state == state


def test_each_state_has_its_own_timeout(stub_broker, monkeypatch):
    # Given UPDATING times out after 10 minutes (CREATING keeps its 3 hours)
    monkeypatch.setenv("JOBS_STUCK_UPDATING_S", "600")
    updating = stuck_instance(State.UPDATING, operation_age=timedelta(minutes=20))
    creating = stuck_instance(State.CREATING, operation_age=timedelta(minutes=20))

    # Then only the one past its state's timeout is rescued
    assert [s.ref for s in sweep(stub_broker)] == [updating.ref]
    assert load(creating).state == State.CREATING


def test_not_stuck_while_a_message_of_its_operation_is_queued(stub_broker, cloud):
    # Given an update (not throttled) whose first step waits in a backlog (no worker), started long ago
    instance = make_instance(make_tenant(), volumes=0)
    with session_scope() as session:
        session.execute(update(Instance).where(Instance.id == instance.id).values(state=State.OK))
    handle = InstanceUpdateExecutor.execute(load(instance), updated_fields=["name"])
    age(handle.id, HOURS_AGO_4)

    # Then the janitor leaves it alone; once the message is lost (flushed broker) it rescues it
    assert is_alive(stub_broker, handle.id)
    assert sweep(stub_broker) == []
    stub_broker.flush_all()
    forget_guards()
    assert [s.ref for s in sweep(stub_broker)] == [instance.ref]
    assert "Stuck in UPDATE_SCHEDULED for 4 h 0 min" in load(instance).error_message


def test_a_create_handed_its_slot_is_alive_until_the_throttle_gives_up_on_it(stub_broker, cloud):
    # Given a create admitted by the throttle whose first step was lost: the throttle re-sends a hand-off
    # whose step never started, so the operation is not dead yet
    instance = make_instance(make_tenant(), volumes=0)
    handle = InstanceCreateExecutor.execute(instance)
    stub_broker.flush_all()
    forget_guards()
    age(handle.id, HOURS_AGO_4)

    # Then the janitor leaves it alone
    assert is_alive(stub_broker, handle.id)
    assert sweep(stub_broker) == []


def test_not_stuck_while_parked_by_the_throttle(stub_broker, cloud):
    # Given two creates on a tenant that allows one at a time: the second is parked (no message anywhere)
    tenant = make_tenant(options={"max_concurrent_provision_instance": 1})
    first, second = make_instance(tenant, "a", volumes=0), make_instance(tenant, "b", volumes=0)
    running = InstanceCreateExecutor.execute(first)
    parked = InstanceCreateExecutor.execute(second)
    age(running.id, HOURS_AGO_4)
    age(parked.id, HOURS_AGO_4)

    # Then neither is touched: one has a queued step, the other its place in the throttle's line
    assert sweep(stub_broker) == []
    assert load(second).state == State.CREATION_SCHEDULED


def test_not_stuck_while_waiting_in_a_delay(stub_broker, cloud):
    # Given an operation whose only message waits in a delay (a poll's next attempt, a retry's backoff)
    instance = make_instance(make_tenant(), volumes=0)
    handle = InstanceCreateExecutor.execute(instance)
    [raw] = list(stub_broker.queues["default"].queue)
    stub_broker.flush_all()
    forget_guards()
    stub_broker.enqueue(Message.decode(raw), delay=60_000)
    age(handle.id, HOURS_AGO_4)

    # Then the janitor leaves it alone
    assert is_alive(stub_broker, handle.id)
    assert sweep(stub_broker) == []


def test_a_rescued_operation_frees_its_throttle_slot_for_the_next(stub_broker, cloud):
    # Given the running create's messages were lost while another create waits for the only slot
    tenant = make_tenant(options={"max_concurrent_provision_instance": 1})
    first, second = make_instance(tenant, "a", volumes=0), make_instance(tenant, "b", volumes=0)
    lost = InstanceCreateExecutor.execute(first)
    InstanceCreateExecutor.execute(second)
    [raw] = list(stub_broker.queues["default"].queue)
    find_throttle(stub_broker).before_step(stub_broker, Message.decode(raw))  # its first step started
    stub_broker.flush_all()
    forget_guards()
    age(lost.id, HOURS_AGO_4)

    # When the janitor rescues the first
    assert [s.ref for s in sweep(stub_broker)] == [first.ref]

    # Then the second was handed the slot: its first step is queued now
    queued = [Message.decode(raw).options.get("resource") for raw in list(stub_broker.queues["default"].queue)]
    assert second.ref in queued


def test_a_resource_whose_operation_moved_on_is_left_alone(stub_broker):
    # Given a stuck resource that an operation claims again between the janitor's scan and its rescue
    instance = stuck_instance(State.DELETING, operation_age=HOURS_AGO_4)
    from scheduler.janitor import find_stuck, rescue

    [stuck] = find_stuck(utcnow(), {state: 3600.0 for state in TRANSITIONAL_STATES})
    with session_scope() as session:
        session.execute(update(Instance).where(Instance.id == instance.id).values(state=State.OK))

    # Then the rescue changes nothing
    assert rescue(stub_broker, stuck, utcnow()) is False
    assert load(instance).state == State.OK


def age(operation_id: str, by: timedelta) -> None:
    """As if the operation had started ``by`` ago: the relay has long cleared the mark of its sent first steps."""
    with session_scope() as session:
        session.execute(
            update(Operation)
            .where(Operation.id == operation_id)
            .values(created_at=utcnow() - by, first_steps_since=None)
        )


# -- on the Redis broker, the janitor asks where each named copy is ------------------------------------------


def step_of(operation_id: str) -> Message:
    return Message(
        "default", "backend_method", ("instance:abc", "update"), {}, {OPTION_OPERATION: operation_id, OPTION_NODE: "0"}
    )


def test_a_copy_named_but_never_sent_does_not_keep_a_stuck_resource_alive(redis_broker: JobsRedisBroker):
    # Given a resource stuck for 4 hours whose operation's in-flight set names one copy, which the broker
    # never got: its sender was killed between naming it (before the send) and sending it
    instance = stuck_instance(State.UPDATING, operation_age=HOURS_AGO_4)
    operation_id = load(instance).operation_id
    inflight = find_inflight(redis_broker)
    never_sent = step_of(operation_id).copy(options={"redis_message_id": "never-sent"})
    # (The Redis broker names a copy in its enqueue's own round trip; a sender of another path names it first.)
    inflight.client.sadd(inflight.keys_of(operation_id)[0], Copy.of(never_sent).name)
    assert [Copy.parse(name) for name in inflight.copies(operation_id)] == [Copy.of(never_sent)]

    # Then its operation is not alive, and the janitor rescues the resource (the name alone would have kept
    # it stuck until the set expires, 8 days later)
    assert not is_alive(redis_broker, operation_id)
    assert [s.ref for s in sweep(redis_broker)] == [instance.ref]
    assert load(instance).state == State.ERRED


def test_a_copy_queued_delayed_or_held_by_a_worker_keeps_its_operation_alive(redis_broker: JobsRedisBroker):
    # Given a stuck-looking resource whose operation has a message queued
    instance = stuck_instance(State.UPDATING, operation_age=HOURS_AGO_4)
    operation_id = load(instance).operation_id
    queued = redis_broker.enqueue(step_of(operation_id))
    assert Copy.parse(*find_inflight(redis_broker).copies(operation_id)).broker_id == queued.options["redis_message_id"]
    assert is_alive(redis_broker, operation_id)

    # ... then fetched by a worker and not yet acknowledged (a worker killed while running it)
    assert redis_broker.do_fetch("default", 10)
    assert is_alive(redis_broker, operation_id)

    # ... then acknowledged after its retry was put in a delay
    redis_broker.enqueue(step_of(operation_id), delay=60_000)
    redis_broker.do_ack("default", queued.options["redis_message_id"])
    find_inflight(redis_broker).after_ack(redis_broker, queued)
    assert is_alive(redis_broker, operation_id)

    # Then the janitor leaves it alone throughout
    assert sweep(redis_broker) == []
    assert load(instance).state == State.UPDATING


def test_a_copy_moving_on_while_the_janitor_looks_keeps_its_operation_alive(redis_broker, monkeypatch):
    # Given an operation whose one queued copy is acknowledged, its successor already named and sent, between
    # the janitor's reading of the names and its asking the broker about them
    instance = stuck_instance(State.UPDATING, operation_age=HOURS_AGO_4)
    operation_id = load(instance).operation_id
    first = redis_broker.enqueue(step_of(operation_id))
    assert redis_broker.do_fetch("default", 10)
    asked = redis_broker.stores

    def moved_on_meanwhile(queue_name: str, redis_message_id: str) -> bool:
        if redis_message_id == first.options["redis_message_id"]:
            redis_broker.enqueue(step_of(operation_id), delay=60_000)
            redis_broker.do_ack("default", redis_message_id)
            find_inflight(redis_broker).after_ack(redis_broker, first)
        return asked(queue_name, redis_message_id)

    monkeypatch.setattr(redis_broker, "stores", moved_on_meanwhile)

    # Then it is alive: the names, read again, have changed
    assert is_alive(redis_broker, operation_id)
