"""Outages with real processes: a service killed right after committing an execute(), Redis down when a
service calls execute(), and Redis killed and restarted under running workers. Nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
import redis
from sqlalchemy import func, select

from jobs.broker import build_broker
from jobs.executors import InstanceCreateExecutor
from jobs.processes import ManagedProcess, start_worker, stop_all
from middleware import find_throttle
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.db import session_scope
from resources.models import Instance, Operation, OperationStatus, OutboxMessage, StepDone
from resources.states import TRANSITIONAL_STATES, State
from tests.fixtures import make_instance, make_tenant, reset_database, wait_for
from tests.integration.redis_server import RestartableRedis
from tests.integration.test_chaos import one_database

pytestmark = pytest.mark.integration

ENV = {
    "JOBS_OUTBOX_GRACE_S": "1",
    "JOBS_OUTBOX_RELAY_INTERVAL_S": "1",
    "JOBS_BROKER_HEARTBEAT_TIMEOUT_MS": "2000",
    "JOBS_BROKER_MAINTENANCE_INTERVAL_S": "0.5",
    "JOBS_THROTTLE_LEASE_S": "3",
    "JOBS_THROTTLE_HEARTBEAT_S": "0.5",
    "JOBS_POLL_INTERVAL_S": "0.1",
}


class Outage:
    """A Redis of the test's own (so that it can be killed), worker processes on it, and a database."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.redis = RestartableRedis(tmp_path / "redis")
        self.workers: list[ManagedProcess] = []

    def start_workers(self, count: int = 1) -> None:
        self.workers += [
            start_worker(
                f"worker{i}", queues=["default", "heavy"], threads=4, env=ENV, log_path=self.tmp_path / f"w{i}.log"
            )
            for i in range(len(self.workers), len(self.workers) + count)
        ]

    def stop(self) -> None:
        stop_all(self.workers)
        self.redis.stop()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp_path.glob("*.log")))


@pytest.fixture
def outage(monkeypatch, tmp_path) -> Iterator[Outage]:
    system = Outage(tmp_path)
    system.redis.start()
    monkeypatch.setenv("REDIS_URL", system.redis.url)
    monkeypatch.setenv("DATABASE_URL", one_database())
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}")
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JOBS_BROKER")
    reset_database()
    SimulatedCloud().configure(SimulatedConfig(latency_ms=(5, 20), build_ms=150, delete_ms=50))
    previous = dramatiq.get_broker()
    dramatiq.set_broker(build_broker())
    try:
        yield system
    finally:
        system.stop()
        dramatiq.set_broker(previous)


def _state(instance: Instance) -> State:
    with session_scope() as session:
        return session.scalars(select(Instance.state).where(Instance.id == instance.id)).one()


def _where_the_running_operations_are(handles: list) -> str:
    """For a failed run: each running operation's finished steps, the outbox, the throttle's view and
    every Redis key of this test's namespace that mentions it (queues, delay queues, ack sets)."""
    client = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    namespace = os.environ["JOBS_NAMESPACE"]
    store = find_throttle(dramatiq.get_broker()).store
    lines = []
    with session_scope() as session:
        running = session.scalars(
            select(Operation).where(
                Operation.id.in_([h.id for h in handles]), Operation.status == OperationStatus.RUNNING
            )
        ).all()
        outbox = [(row.operation_id, row.messages) for row in session.scalars(select(OutboxMessage))]
        for operation in running:
            done = session.scalars(select(StepDone.path).where(StepDone.operation_id == operation.id)).all()
            lines.append(
                f"running {operation.id} {operation.resource_ref}: done {sorted(done)}, first steps marked since "
                f"{operation.first_steps_since}"
            )
            lines.append(f"  throttle state {store.state_of(operation.id)}")
    lines.append(f"outbox: {outbox}")
    for scope in store.scopes():
        lines.append(f"scope {store.explain(scope)}")
    ids = {operation.id for operation in running}
    for key in sorted(client.scan_iter(f"{namespace}*")):
        kind = client.type(key)
        if kind == "hash":
            values = client.hgetall(key)
            hits = {k: v[:300] for k, v in values.items() if any(i in v or i in k for i in ids)}
            lines.append(f"{key} hash({len(values)}) mentions: {hits}")
        elif kind == "list":
            lines.append(f"{key} list {client.lrange(key, 0, -1)[:50]}")
        elif kind == "zset":
            lines.append(f"{key} zset {client.zrange(key, 0, 50, withscores=True)}")
        elif kind == "set":
            lines.append(f"{key} set {sorted(client.smembers(key))[:50]}")
        else:
            lines.append(f"{key} {kind}")
    return "\n".join(lines)


def _unsent() -> int:
    """Outbox rows, and running operations whose first steps are not known sent."""
    with session_scope() as session:
        rows = session.scalar(select(func.count()).select_from(OutboxMessage)) or 0
        marked = select(func.count()).where(
            Operation.status == OperationStatus.RUNNING, Operation.first_steps_since.is_not(None)
        )
        return rows + (session.scalar(marked) or 0)


#: A service that commits an execute() and is killed before it can send anything.
_KILLED_AFTER_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    import jobs.executors.base as base
    from jobs.executors import InstanceCreateExecutor
    from resources.db import session_scope
    from resources.models import Instance

    base.send_first_steps = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # dies between commit and send
    with session_scope() as session:
        InstanceCreateExecutor.execute(session.get(Instance, int(sys.argv[1])))
    """
)


def test_a_service_killed_right_after_its_commit_loses_no_operation(outage):
    # Given a service process that commits an execute() and is SIGKILLed before sending its messages
    instance = make_instance(make_tenant(), volumes=1)
    env = {**os.environ}
    env.pop("JOBS_BROKER", None)
    service = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_COMMIT, str(instance.id)], env=env, capture_output=True, timeout=60
    )
    killed_at = time.monotonic()
    assert service.returncode == -signal.SIGKILL, service.stderr.decode()
    # ... its transaction committed: the operation and its messages are in the database, nothing in Redis
    with session_scope() as session:
        operation = session.scalars(select(Operation).where(Operation.resource_ref == instance.ref)).one()
    assert operation.status == OperationStatus.RUNNING
    assert _state(instance) == State.CREATION_SCHEDULED
    assert _unsent() == 1

    # When a worker runs
    outage.start_workers()

    # Then its outbox relay sends the messages and the operation runs to its end
    wait_for(lambda: _state(instance) == State.OK, timeout_s=60)
    print(f"\nkilled after commit: the operation ended {time.monotonic() - killed_at:.1f} s after the kill")
    wait_for(lambda: _unsent() == 0, timeout_s=30)


def test_redis_down_at_execute_commits_and_the_operation_runs_once_redis_is_back(outage):
    # Given workers, and Redis down
    outage.start_workers()
    instance = make_instance(make_tenant(), volumes=1)
    outage.redis.kill()

    # When a service executes: its call returns and its transaction commits
    handle = InstanceCreateExecutor.execute(instance)
    assert handle.status() == OperationStatus.RUNNING
    assert _unsent() == 1

    # Then once Redis is back the operation runs, once
    outage.redis.start()
    wait_for(lambda: _state(instance) == State.OK, timeout_s=90)
    # The resource is OK once its last step has run; the operation ends when that step is recorded, after.
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert SimulatedCloud().creates_made("instance") == 1
    wait_for(lambda: _unsent() == 0, timeout_s=30)


def test_redis_killed_and_restarted_under_running_workers_loses_nothing(outage):
    # Given two workers busy with 30 creates
    outage.start_workers(2)
    tenant = make_tenant(options={"max_concurrent_provision_instance": 10})
    instances = [make_instance(tenant, f"vm{n}", volumes=1) for n in range(30)]
    handles = [InstanceCreateExecutor.execute(instance) for instance in instances]
    wait_for(lambda: sum(_state(i) != State.CREATION_SCHEDULED for i in instances) >= 5, timeout_s=60)

    # When Redis is SIGKILLed mid-run and started again a moment later
    outage.redis.kill()
    time.sleep(1)  # the length of the outage, not a synchronisation
    outage.redis.start()

    # Then every operation still ends, and succeeds; no resource is left in a transitional state
    def all_ended() -> bool:
        with session_scope() as session:
            ids = [h.id for h in handles]
            running = session.scalar(
                select(func.count()).where(Operation.id.in_(ids), Operation.status == OperationStatus.RUNNING)
            )
            return running == 0

    try:
        wait_for(all_ended, timeout_s=120)
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{_where_the_running_operations_are(handles)}\n{outage.logs()}") from None
    with session_scope() as session:
        ended = session.scalars(select(Operation).where(Operation.id.in_([h.id for h in handles]))).all()
        failures = [
            f"{o.id} {o.status} at {o.failed_step}: {o.error_message}" for o in ended if o.status != "succeeded"
        ]
    assert not failures, "\n".join(failures)
    wait_for(lambda: all(_state(i) not in TRANSITIONAL_STATES for i in instances), timeout_s=30)
    assert {_state(i) for i in instances} == {State.OK}
    assert SimulatedCloud().duplicate_creates() == {}
