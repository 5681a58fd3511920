"""The broker with real worker processes: malformed messages do not disturb a worker, and a SIGKILLed
worker's in-flight step is picked up by another within heartbeat timeout + maintenance interval."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq import Message
from sqlalchemy import select

from jobs.broker import build_broker
from jobs.executors import InstanceCreateExecutor, VolumeCreateExecutor
from jobs.processes import ManagedProcess, start_worker, stop_all
from jobs.redis_broker import JobsRedisBroker
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.db import session_scope
from resources.models import Instance, Operation, Volume
from resources.states import State
from tests.fixtures import make_instance, make_tenant, reset_database, wait_for
from tests.integration.conftest import redis_broker_only
from tests.integration.test_full_cycle import _databases

pytestmark = [pytest.mark.integration, redis_broker_only]

QUEUE = "default"


@dataclass
class System:
    """Worker processes on the real Redis, sharing one database with this process."""

    monkeypatch: pytest.MonkeyPatch
    tmp_path: Path
    workers: list[ManagedProcess] = field(default_factory=list)
    broker: JobsRedisBroker | None = None

    def begin(self, **env: str) -> JobsRedisBroker:
        """Set the environment (this process's broker and the workers read the same), build the broker."""
        for name, value in env.items():
            self.monkeypatch.setenv(name, value)
        broker = build_broker()
        assert isinstance(broker, JobsRedisBroker)
        dramatiq.set_broker(broker)
        self.broker = broker
        return broker

    def start_worker(self, name: str) -> ManagedProcess:
        worker = start_worker(name, queues=[QUEUE], threads=4, log_path=self.tmp_path / f"{name}.log")
        self.workers.append(worker)
        return worker

    def key(self, suffix: str) -> str:
        assert self.broker is not None
        return f"{self.broker.namespace}:{suffix}"

    def heartbeats(self) -> set[str]:
        return {m.decode() for m in self.broker.client.zrange(self.key("__heartbeats__"), 0, -1)}

    def ack_holders(self) -> dict[str, set[str]]:
        """Worker id → the message ids of QUEUE it fetched and has not acknowledged."""
        prefix = self.key("__acks__.")
        holders = {}
        for key in self.broker.client.scan_iter(f"{prefix}*.{QUEUE}", count=1000):
            worker_id = key.decode()[len(prefix) : -len(f".{QUEUE}")]
            holders[worker_id] = {m.decode() for m in self.broker.client.smembers(key)}
        return {w: ids for w, ids in holders.items() if ids}

    def wait_for_new_worker(self, known: set[str]) -> str:
        """The broker id of a worker that has started polling since ``known`` was taken."""
        return wait_for(lambda: next(iter(self.heartbeats() - known - {self.broker.broker_id}), None), 60)

    def push_raw(self, message_id: str, body: bytes) -> None:
        """What dispatch.lua's enqueue does, bypassing Dramatiq's encoding."""
        self.broker.client.hset(self.key(f"{QUEUE}.msgs"), message_id, body)
        self.broker.client.rpush(self.key(QUEUE), message_id)

    def dead_letters(self) -> set[str]:
        return {m.decode() for m in self.broker.client.zrange(self.key(f"{QUEUE}.XQ"), 0, -1)}

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.tmp_path.glob("*.log")))


@pytest.fixture(params=_databases())
def system(request, monkeypatch, tmp_path) -> Iterator[System]:
    monkeypatch.setenv("DATABASE_URL", request.param)
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("JOBS_POLL_INTERVAL_S", "0.1")
    monkeypatch.delenv("JOBS_BROKER")
    reset_database()
    previous = dramatiq.get_broker()
    system = System(monkeypatch, tmp_path)
    cloud = SimulatedCloud()
    try:
        yield system
    finally:
        stop_all(system.workers)
        dramatiq.set_broker(previous)
        cloud.reset()
        if system.broker is not None:
            keys = list(system.broker.client.scan_iter(f"{system.broker.namespace}:*", count=1000))
            if keys:
                system.broker.client.delete(*keys)


def _status(operation_id: str) -> str:
    with session_scope() as session:
        return session.scalars(select(Operation.status).where(Operation.id == operation_id)).one()


def _operation(operation_id: str) -> Operation:
    with session_scope() as session:
        operation = session.get_one(Operation, operation_id)
        session.expunge(operation)
        return operation


def _state(model: type[Instance] | type[Volume], uuid_: str) -> State:
    with session_scope() as session:
        return session.scalars(select(model.state).where(model.uuid == uuid_)).one()


def test_malformed_messages_are_dead_lettered_and_the_worker_carries_on(system):
    # Given a running worker
    broker = system.begin()
    SimulatedCloud().configure(SimulatedConfig(latency_ms=(5, 20), build_ms=100, delete_ms=50, seed=1))
    worker = system.start_worker("worker")
    system.wait_for_new_worker(known=set())

    # When bad bodies are pushed into its queue: bytes, JSON that is no message, messages that are almost
    # right (Dramatiq would decode the last three and then fail on them, or crash a worker thread)
    almost = Message(queue_name=QUEUE, actor_name="state_transition", args=(), kwargs={}, options={})
    bad = {
        "bytes": b"\x00\xff\xfe not even utf-8",
        "json-list": b"[1, 2, 3]",
        "json-object": json.dumps({"hello": "world"}).encode(),
        "no-redis-id": almost.encode(),
        "args-a-string": json.dumps({**almost.asdict(), "args": "ab", "options": {"redis_message_id": "x"}}).encode(),
        "other-queue": almost.copy(queue_name="nowhere", options={"redis_message_id": "other-queue"}).encode(),
    }
    for message_id, body in bad.items():
        system.push_raw(message_id, body)

    # Then each ends in the dead-letter queue
    wait_for(lambda: system.dead_letters() >= set(bad), timeout_s=60)

    # ... and a real operation still runs to its end on the same worker, which is still alive
    instance = make_instance(make_tenant(), "vm-after-garbage", volumes=1)
    handle = InstanceCreateExecutor.execute(instance)
    wait_for(lambda: _status(handle.id) != "running", timeout_s=120)
    assert _status(handle.id) == "succeeded", system.logs()
    assert worker.alive()
    log = (system.tmp_path / "worker.log").read_text(errors="replace")
    assert "unexpected error" not in log
    assert log.count("is malformed") >= len(bad)

    # When the first message of an operation arrives malformed, but still naming its operation
    captured: list[Message[Any]] = []

    def capture(message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        captured.append(message)
        return message

    second = make_instance(make_tenant("tenant-2"), "vm-unreadable", volumes=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(broker, "enqueue", capture)
        unreadable = InstanceCreateExecutor.execute(second)
    (first_step,) = captured
    redis_message_id = str(uuid.uuid4())
    fields = {**first_step.asdict(), "args": "not a list", "options": {**first_step.options}}
    fields["options"]["redis_message_id"] = redis_message_id
    system.push_raw(redis_message_id, json.dumps(fields).encode())

    # Then that operation fails, its error naming the dead-lettered message, and its resource is ERRED
    wait_for(lambda: _status(unreadable.id) != "running", timeout_s=60)
    operation = _operation(unreadable.id)
    assert operation.status == "failed"
    assert f"message {redis_message_id} on queue {QUEUE} could not be read" in operation.error_message
    assert "it was dead-lettered" in operation.error_message
    assert redis_message_id in system.dead_letters()
    wait_for(lambda: _state(Instance, second.uuid) == State.ERRED, timeout_s=60)
    assert worker.alive()


def test_a_killed_workers_step_is_picked_up_by_another_worker(system):
    # Given short broker heartbeats, frequent forced maintenance and practically no random maintenance
    system.begin(
        JOBS_BROKER_HEARTBEAT_TIMEOUT_MS="2000",
        JOBS_BROKER_MAINTENANCE_INTERVAL_S="0.5",
        JOBS_BROKER_MAINTENANCE_CHANCE="1",
    )
    # ... a cloud whose every call takes 3 s
    cloud = SimulatedCloud()
    cloud.configure(SimulatedConfig(latency_ms=(3000, 3000), build_ms=100, delete_ms=50, seed=1))
    tenant = make_tenant()
    with session_scope() as session:
        volume = Volume(name="slow-volume", size_gb=10, service_settings_id=tenant.id)
        session.add(volume)
    victim = system.start_worker("victim")
    victim_id = system.wait_for_new_worker(known=set())

    # When a volume is created and its create step is under way on the first worker (the step's
    # transition to CREATING is committed just before the slow cloud call)
    handle = VolumeCreateExecutor.execute(volume)
    wait_for(lambda: _state(Volume, volume.uuid) == State.CREATING, timeout_s=60)
    # ... a second worker is up and polling
    system.start_worker("rescuer")
    rescuer_id = system.wait_for_new_worker(known={victim_id})
    # ... and the first is SIGKILLed mid-step (every cloud call takes 3 s: it holds the create or the poll)
    in_flight = wait_for(lambda: system.ack_holders().get(victim_id), timeout_s=10)
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    killed_at = time.monotonic()
    assert in_flight and _status(handle.id) == "running"

    # Then the second worker's maintenance puts the step back and the second worker takes it
    wait_for(lambda: in_flight & system.ack_holders().get(rescuer_id, set()) or _status(handle.id) != "running", 60)
    picked_up_s = time.monotonic() - killed_at
    # ... and the operation ends, successfully
    wait_for(lambda: _status(handle.id) != "running", timeout_s=120)
    ended_s = time.monotonic() - killed_at
    assert _status(handle.id) == "succeeded", system.logs()
    assert _state(Volume, volume.uuid) == State.OK
    assert victim_id not in system.ack_holders()
    print(
        f"\nredelivery after SIGKILL (heartbeat timeout 2 s, maintenance every 0.5 s): step picked up again "
        f"{picked_up_s:.2f} s after the kill; operation ended {ended_s:.2f} s after it (cloud calls take 3 s); "
        f"volume.create attempts completed: {cloud.redis.get(f'{cloud.prefix}:attempts:volume.create:{volume.uuid}')}"
    )
