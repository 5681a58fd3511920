"""BROKER_URL=amqp://… makes RabbitMQ the message broker, with the same middleware; anything else there is
refused with the variable, the reason and the fix."""

from __future__ import annotations

import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from jobs.redis_broker import BrokerMaintenance
from middleware import OperationTransitions, OutboxRelay, Throttle
from resources.config import get_settings
from resources.errors import ConfigurationError


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("redis://127.0.0.1:6379/0", "has scheme 'redis'"),
        ("127.0.0.1:5672", "has no scheme"),
        ("amqp://guest:secret@rabbit:notaport/", "has a port that is not a number"),
    ],
)
def test_a_broker_url_that_is_not_amqp_is_refused_with_the_fix(monkeypatch, value, problem):
    monkeypatch.setenv("BROKER_URL", value)
    with pytest.raises(ConfigurationError, match="BROKER_URL=") as raised:
        get_settings()
    assert problem in str(raised.value)
    assert "amqp://" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_an_amqp_url_is_kept_and_its_password_hidden(monkeypatch):
    monkeypatch.setenv("BROKER_URL", "amqp://jobs:secret@rabbit.example:5672/prod")
    settings = get_settings()
    assert settings.amqp_url == "amqp://jobs:secret@rabbit.example:5672/prod"
    assert "secret" not in repr(settings)


def test_without_broker_url_the_broker_stays_redis(monkeypatch):
    monkeypatch.delenv("BROKER_URL", raising=False)
    assert get_settings().amqp_url is None


def test_build_broker_makes_a_rabbitmq_broker_with_the_projects_middleware(monkeypatch):
    # Building connects to nothing yet: RabbitMQ is reached on the first send or consume
    monkeypatch.delenv("JOBS_BROKER")
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
    from jobs.broker import build_broker

    broker = build_broker()
    assert isinstance(broker, RabbitmqBroker)
    assert broker.confirm_delivery  # a send returns once RabbitMQ has the message: the outbox relies on it
    kinds = {type(m) for m in broker.middleware}
    assert {OperationTransitions, Throttle, OutboxRelay} <= kinds
    assert BrokerMaintenance not in kinds  # Redis-only: RabbitMQ gives a dead consumer's messages back itself
    assert {"default", "heavy", "background"} <= set(broker.get_declared_queues())
