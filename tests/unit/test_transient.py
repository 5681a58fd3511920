"""Transient infrastructure errors delay a step, they do not fail its operation: a database blip in a
step, before it, or while its completion is recorded; a broker that cannot take a retry right now.
A message for an actor no worker declares ends its operation instead of leaving it waiting."""

from __future__ import annotations

import json
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.encoder import JSONEncoder
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

import middleware.transitions
from jobs.executors import InstanceCreateExecutor
from middleware import find_throttle
from middleware.plan import OPTION_OPERATION
from middleware.transient import PatientRetries, is_transient, retry_transient
from resources.backends.simulated import SimulatedInstanceBackend
from resources.db import session_scope
from resources.models import Instance, Operation, OperationStatus
from resources.states import State
from tests.fixtures import drain, make_instance, make_tenant, wait_for


def database_blip() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def fail_first(times: int, error: Any, real: Any) -> Any:
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return real(*args, **kwargs)

    return wrapper


def instance_after(instance: Instance) -> Instance:
    with session_scope() as session:
        return session.scalars(select(Instance).where(Instance.id == instance.id)).one()


def test_the_errors_that_count_as_transient():
    assert is_transient(database_blip())
    assert is_transient(redis.ConnectionError("refused"))
    assert not is_transient(ValueError("a bug"))
    assert retry_transient(0, database_blip())
    assert not retry_transient(0, ValueError("a bug"))


def test_a_database_blip_in_a_step_is_retried_not_erred(stub_broker, stub_worker, cloud, monkeypatch):
    # Given the backend's create meets a dropped database connection twice
    instance = make_instance(make_tenant(), volumes=0)
    monkeypatch.setattr(
        SimulatedInstanceBackend, "create", fail_first(2, database_blip, SimulatedInstanceBackend.create)
    )

    # When the instance is created
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)

    # Then the operation succeeded after the blips
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert instance_after(instance).state == State.OK


def test_a_blip_that_outlasts_the_retries_fails_the_operation(stub_broker, stub_worker, cloud, monkeypatch):
    monkeypatch.setenv("JOBS_TRANSIENT_RETRIES", "2")
    instance = make_instance(make_tenant(), volumes=0)
    monkeypatch.setattr(
        SimulatedInstanceBackend, "create", fail_first(100, database_blip, SimulatedInstanceBackend.create)
    )
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    assert handle.wait(timeout=30).status == OperationStatus.FAILED
    after = instance_after(instance)
    assert after.state == State.ERRED
    assert "server closed the connection" in after.error_message


def test_a_database_blip_before_a_step_retries_it_instead_of_running_it_unchecked(
    stub_broker, stub_worker, cloud, monkeypatch
):
    # Given the check before each step meets a dropped database connection the first time
    instance = make_instance(make_tenant(), volumes=0)
    monkeypatch.setattr(
        middleware.transitions, "check_step", fail_first(1, database_blip, middleware.transitions.check_step)
    )

    # When the instance is created
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)

    # Then it succeeded, and its first step ran once (the unchecked attempt never ran)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert cloud.creates_made("instance") == 1


def test_a_database_blip_while_recording_a_step_is_retried_in_place(stub_broker, stub_worker, cloud, monkeypatch):
    instance = make_instance(make_tenant(), volumes=0)
    # (Whichever way the record is made: on PostgreSQL the last step's is one statement of its own.)
    monkeypatch.setattr(
        middleware.transitions, "complete_step", fail_first(1, database_blip, middleware.transitions.complete_step)
    )
    monkeypatch.setattr(
        middleware.transitions,
        "finish_without_session",
        fail_first(1, database_blip, middleware.transitions.finish_without_session),
    )
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert instance_after(instance).state == State.OK


class FlakyBroker:
    """Refuses the first ``refusals`` enqueues, like a Redis restarting."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.enqueued: list[tuple[Message[Any], int | None]] = []
        self.actor = type("Actor", (), {"options": {}})()

    def get_actor(self, name: str) -> Any:
        return self.actor

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        if self.refusals:
            self.refusals -= 1
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.enqueued.append((message, delay))
        return message


def test_a_retry_the_broker_cannot_take_now_is_enqueued_once_it_can():
    # Given a step that failed and will be retried, and a broker that refuses two enqueues
    broker = FlakyBroker(refusals=2)
    retries = PatientRetries(max_retries=3, min_backoff=10, enqueue_wait_s=lambda attempt: 0.0)
    message = MessageProxy(Message("default", "step", (), {}, {}))

    # When Retries handles the failure
    try:
        raise ValueError("boom")
    except ValueError as error:
        retries.after_process_message(broker, message, exception=error)  # type: ignore[arg-type]

    # Then the retry was enqueued (Dramatiq's Retries would have lost it), and not failed
    assert [m.message_id for m, _delay in broker.enqueued] == [message.message_id]
    assert not message.failed


@pytest.mark.parametrize("actor_name", ["no_such_actor", "backend_method_v2"])
def test_a_message_for_an_unknown_actor_ends_its_operation(stub_broker, stub_worker, cloud, monkeypatch, actor_name):
    # Given an operation whose first message never reached the broker (held in the outbox)
    instance = make_instance(make_tenant(), volumes=0)
    throttle = find_throttle(stub_broker)
    assert throttle is not None
    refuse = fail_first(1, lambda: redis.ConnectionError("refused"), None)
    monkeypatch.setattr(stub_broker, "enqueue", refuse)
    monkeypatch.setattr(throttle.store, "acquire", refuse)
    handle = InstanceCreateExecutor.execute(instance)
    monkeypatch.undo()

    # When a message of that operation names an actor this worker does not declare
    stub_broker.enqueue(Message("default", actor_name, (instance.ref,), {}, {OPTION_OPERATION: handle.id}))
    wait_for(lambda: instance_after(instance).state == State.ERRED, timeout_s=30)

    # Then it is dead-lettered and the operation fails, naming the actor and the fix; the resource is ERRED
    with session_scope() as session:
        operation = session.get_one(Operation, handle.id)
        assert operation.status == OperationStatus.FAILED
        assert repr(actor_name) in operation.error_message
        assert "Deploy the code that declares the actor" in operation.error_message
    assert len(stub_broker.dead_letters) == 1


def test_messages_are_json_never_pickle(stub_broker, cloud):
    # Given the project's broker
    assert type(dramatiq.get_encoder()) is JSONEncoder
    # Then an operation's first message is plain JSON with the resource's reference, not the object
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance)
    queue = stub_broker.queues["default"]
    body = queue.get_nowait()
    queue.task_done()  # taken off by hand: or the next test's drain would wait for it to be processed
    decoded = json.loads(body)
    assert decoded["args"][0] == instance.ref
