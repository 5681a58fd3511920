"""The simulated cloud's create behaves as a real cloud's does for its caller: idempotent, and atomic even
when the caller is killed or Redis is lost in the middle of it."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from resources.backends import SimulatedCloud
from tests.fixtures import make_instance, make_tenant


def test_a_repeated_create_returns_the_same_object_and_counts_once(database, cloud):
    instance = make_instance(make_tenant(), volumes=0)

    first = cloud.create(instance, {"flavor": "small"})
    second = cloud.create(instance, {"flavor": "small"})

    assert second["backend_id"] == first["backend_id"]
    assert cloud.object(first["backend_id"])["type"] == "instance"
    assert cloud.creates_made("instance") == 1
    assert cloud.duplicate_creates() == {}


def test_a_create_whose_reply_was_lost_is_completed_and_found_on_retry(database, cloud, monkeypatch):
    # Given a create that reaches Redis, whose answer is then lost (a killed worker, a restarted Redis)
    instance = make_instance(make_tenant(), volumes=0)
    ref_key = f"{cloud.prefix}:ref:{instance.ref}"
    real_execute = cloud.redis.execute_command
    lost = []

    def execute_then_lose_the_reply(*args: Any, **options: Any) -> Any:
        reply = real_execute(*args, **options)
        if ref_key in args and not lost:
            lost.append(args[0])
            raise redis.ConnectionError("connection lost after the command ran")
        return reply

    monkeypatch.setattr(cloud.redis, "execute_command", execute_then_lose_the_reply)
    with pytest.raises(redis.ConnectionError):
        cloud.create(instance, {})

    # When the step retries the create
    retried = cloud.create(instance, {})

    # Then it gets the one object the first attempt made, complete
    assert lost
    assert cloud.object(retried["backend_id"])["status"] == "BUILD"
    assert cloud.creates_made("instance") == 1


def test_clients_of_other_namespaces_see_nothing(database, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    cloud.create(instance, {})
    other = SimulatedCloud(cloud.redis, namespace="another-namespace")
    assert other.creates_made("instance") == 0
