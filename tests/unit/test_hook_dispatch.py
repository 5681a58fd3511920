"""The project's brokers send each signal only to the middleware that handle it, with Dramatiq's order, arguments
and error handling, and see a middleware list that changed since the last signal."""

from __future__ import annotations

import logging

import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Middleware, MiddlewareError

from jobs.broker import JobsRabbitmqBroker, JobsStubBroker
from jobs.hook_dispatch import HandlersOnly
from jobs.redis_broker import JobsRedisBroker


class Recorder(Middleware):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def before_ack(self, broker, message):
        self.calls.append(("before_ack", self.name, message))

    def after_ack(self, broker, message):
        self.calls.append(("after_ack", self.name, message))


class Silent(Middleware):
    """Handles no signal."""


def broker_with(*middleware: Middleware) -> JobsStubBroker:
    broker = JobsStubBroker(middleware=[])
    for each in middleware:
        broker.add_middleware(each)
    return broker


def test_every_broker_the_project_builds_dispatches_to_handlers_only():
    for kind in (JobsRedisBroker, JobsRabbitmqBroker, JobsStubBroker):
        assert issubclass(kind, HandlersOnly)


def test_handlers_run_in_dramatiqs_order_with_the_signals_arguments():
    calls: list = []
    broker = broker_with(Recorder("a", calls), Silent(), Recorder("b", calls))
    broker.emit_before("ack", "m1")
    broker.emit_after("ack", "m2")
    assert calls == [
        ("before_ack", "a", "m1"),
        ("before_ack", "b", "m1"),
        ("after_ack", "b", "m2"),  # after-hooks in reverse, as Dramatiq runs them
        ("after_ack", "a", "m2"),
    ]


def test_a_middleware_that_does_not_handle_a_signal_is_not_called_for_it(monkeypatch):
    # Middleware's own no-op, made observable: a broker that calls it for every middleware counts them all.
    noop_calls: list = []
    monkeypatch.setattr(Middleware, "before_ack", lambda self, broker, message: noop_calls.append(self))
    calls: list = []
    middleware = [Silent(), Recorder("a", calls), Silent()]

    broker_with(*middleware).emit_before("ack", "m")
    assert noop_calls == []
    assert calls == [("before_ack", "a", "m")]

    plain = StubBroker(middleware=[])  # Dramatiq's dispatch, for contrast
    for each in middleware:
        plain.add_middleware(each)
    plain.emit_before("ack", "m")
    assert len(noop_calls) == 2


def test_a_changed_middleware_list_is_seen_at_the_next_signal():
    calls: list = []
    broker = broker_with(Recorder("a", calls))
    broker.emit_before("ack", 1)
    broker.add_middleware(Recorder("b", calls))
    broker.emit_before("ack", 2)
    broker.middleware.remove(broker.middleware[0])  # edited in place, as tests do
    broker.emit_before("ack", 3)
    assert calls == [("before_ack", "a", 1), ("before_ack", "a", 2), ("before_ack", "b", 2), ("before_ack", "b", 3)]


def test_a_hook_replaced_on_a_middleware_after_a_signal_is_the_one_called(monkeypatch):
    calls: list = []
    recorder = Recorder("a", calls)
    broker = broker_with(recorder)
    broker.emit_before("ack", 1)
    monkeypatch.setattr(recorder, "before_ack", lambda broker, message: calls.append(("patched", message)))
    broker.emit_before("ack", 2)
    assert calls == [("before_ack", "a", 1), ("patched", 2)]


def test_a_failing_hook_is_logged_and_the_others_still_run(caplog):
    calls: list = []

    class Failing(Middleware):
        def before_ack(self, broker, message):
            raise RuntimeError("boom")

        def after_ack(self, broker, message):
            raise RuntimeError("boom after")

    broker = broker_with(Failing(), Recorder("a", calls))
    with caplog.at_level(logging.CRITICAL):
        broker.emit_before("ack", "m")
        broker.emit_after("ack", "m")
    assert calls == [("before_ack", "a", "m"), ("after_ack", "a", "m")]
    failures = [record.getMessage() for record in caplog.records if record.levelno == logging.CRITICAL]
    assert any("before_ack" in text and "Failing" in text for text in failures)
    assert any("after_ack" in text and "Failing" in text for text in failures)


def test_a_middleware_error_before_a_signal_stops_it_as_in_dramatiq():
    calls: list = []

    class Refusing(Middleware):
        def before_ack(self, broker, message):
            raise MiddlewareError("refused")

    broker = broker_with(Refusing(), Recorder("a", calls))
    with pytest.raises(MiddlewareError, match="refused"):
        broker.emit_before("ack", "m")
    assert calls == []
