"""FieldsProxy: the proxy a worker runs a step as reads its message's fields as its own attributes, so that a
step's middleware, reading them dozens of times, never goes through MessageProxy.__getattr__."""

from __future__ import annotations

import dataclasses
from typing import Any

import dramatiq
import pytest
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.middleware import CurrentMessage

from jobs import queues
from jobs.executors import BaseExecutor
from jobs.executors.base import Signature
from middleware.message_proxy import FieldsProxy
from resources.models import OperationStatus, Resource
from tests.fixtures import drain, make_instance, make_tenant

FIELDS = [field.name for field in dataclasses.fields(Message)]

#: The proxy type each step ran as, by its label.
ran_as: dict[str, type] = {}


@dramatiq.actor(queue_name=queues.DEFAULT)
def proxy_probe(label: str) -> None:
    ran_as[label] = type(CurrentMessage.get_current_message())


class ThreeSteps(BaseExecutor):
    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return [proxy_probe.message(f"s{i}") for i in range(3)]


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names MessageProxy.__getattr__ is asked for from now on."""
    asked: list[str] = []
    original = MessageProxy.__getattr__

    def counting(self: MessageProxy, name: str) -> Any:
        asked.append(name)
        return original(self, name)

    monkeypatch.setattr(MessageProxy, "__getattr__", counting)
    return asked


def a_message() -> Message[Any]:
    return Message(queue_name="default", actor_name="probe", args=(1, "two"), kwargs={"three": 3}, options={"x": 1})


def test_a_fields_proxy_reads_what_its_message_holds():
    # Given a message and its proxy
    message = a_message()
    proxy = FieldsProxy(message)

    # Then every field reads the same object, the message's methods still work through it, and its options are
    # the message's own dict (what a middleware adds to one, the other has)
    assert all(getattr(proxy, name) is getattr(message, name) for name in FIELDS)
    assert proxy.asdict() == message.asdict()
    assert proxy.copy(queue_name="heavy").queue_name == "heavy"
    proxy.options["added"] = True
    assert message.options["added"] is True
    # And it is still a proxy: not failed, no exception, equal to its message
    assert proxy.failed is False and proxy._exception is None and proxy._message is message
    assert proxy == message and isinstance(proxy, MessageProxy)


def test_a_fields_proxy_reads_its_fields_without_the_getattr_fallback(fallbacks):
    # Given a fields proxy and Dramatiq's own proxy of the same message
    message = a_message()
    fields_proxy, plain_proxy = FieldsProxy(message), MessageProxy(message)

    # When each field is read from both
    for name in FIELDS:
        getattr(fields_proxy, name)
    only_fields_proxy = list(fallbacks)
    for name in FIELDS:
        getattr(plain_proxy, name)

    # Then Dramatiq's proxy went through __getattr__ for each, the fields proxy for none
    assert only_fields_proxy == []
    assert fallbacks == FIELDS


def test_chained_steps_run_as_fields_proxies(stub_broker, stub_worker):
    # Given a three-step operation (the stub broker delivers its first step as Dramatiq's own proxy)
    ran_as.clear()
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = ThreeSteps.execute(instance)
    drain(stub_broker)

    # Then the steps this worker ran after the first, without the broker, ran as fields proxies
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert ran_as["s0"] is not FieldsProxy
    assert ran_as == {"s0": ran_as["s0"], "s1": FieldsProxy, "s2": FieldsProxy}
