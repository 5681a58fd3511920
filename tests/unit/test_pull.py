"""The periodic pull: refresh settled resources, recover healthy ERRED ones, mark vanished ones."""

from __future__ import annotations

from dramatiq import Message
from sqlalchemy import select, update

from jobs.executors import InstanceCreateExecutor
from resources.db import session_scope
from resources.models import Instance
from resources.states import State
from scheduler.pull import GONE_MESSAGE, pull_resource, pull_resources
from tests.fixtures import drain, make_instance, make_tenant


def created_instance(stub_broker, cloud) -> Instance:  # type: ignore[no-untyped-def]
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    return load(instance)


def load(instance: Instance) -> Instance:
    with session_scope() as session:
        return session.scalars(select(Instance).where(Instance.id == instance.id)).one()


def set_row(instance: Instance, **values) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as session:
        session.execute(update(Instance).where(Instance.id == instance.id).values(**values))


def test_an_ok_resource_gets_its_runtime_state_from_the_backend(stub_broker, stub_worker, cloud):
    instance = created_instance(stub_broker, cloud)
    set_row(instance, runtime_state="drifted")
    pull_resource(instance.ref)
    assert load(instance).runtime_state == "ACTIVE" and load(instance).state == State.OK


def test_an_erred_resource_healthy_at_its_backend_is_recovered(stub_broker, stub_worker, cloud):
    instance = created_instance(stub_broker, cloud)
    set_row(instance, state=State.ERRED, error_message="resize failed")
    pull_resource(instance.ref)
    after = load(instance)
    assert after.state == State.OK and after.error_message == ""


def test_a_resource_gone_at_its_backend_is_marked_erred(stub_broker, stub_worker, cloud):
    instance = created_instance(stub_broker, cloud)
    cloud.redis.delete(f"{cloud.prefix}:obj:{instance.backend_id}")
    pull_resource(instance.ref)
    after = load(instance)
    assert after.state == State.ERRED and after.error_message == GONE_MESSAGE


def test_a_resource_an_operation_took_meanwhile_is_left_to_it(stub_broker, stub_worker, cloud):
    instance = created_instance(stub_broker, cloud)
    set_row(instance, state=State.UPDATE_SCHEDULED)
    cloud.redis.delete(f"{cloud.prefix}:obj:{instance.backend_id}")
    pull_resource(instance.ref)
    assert load(instance).state == State.UPDATE_SCHEDULED


def test_the_fan_out_queues_one_pull_per_resource_and_never_two(stub_broker, stub_worker, cloud):
    # Given two settled instances and no worker taking pulls for now
    first, second = created_instance(stub_broker, cloud), created_instance(stub_broker, cloud)
    stub_worker.pause()

    # When the pull runs twice before any pull job ran
    pull_resources()
    pull_resources()

    # Then each resource has exactly one pull queued
    pulls = [Message.decode(raw) for raw in list(stub_broker.queues["background"].queue)]
    assert sorted(m.args[0] for m in pulls if m.actor_name == "pull_resource") == sorted([first.ref, second.ref])
    stub_worker.resume()
    drain(stub_broker)
