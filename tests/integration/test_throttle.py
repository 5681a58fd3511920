"""The throttle with real worker processes on a real Redis and a real database, checked by an auditor
that reads only a stream of step starts and ends (``benchmarks/audit.py``), never the throttle's data."""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from sqlalchemy import insert, select

from benchmarks.audit import AuditLog, audit, read_events
from benchmarks.workload import AuditedExecutor
from jobs.broker import build_broker
from jobs.executors.throttling import provisioning_scope
from jobs.processes import ManagedProcess, start_worker, stop_all
from middleware import ThrottleScope, find_throttle
from resources.db import session_scope
from resources.models import Instance, Operation, Resource
from resources.redis_client import get_redis
from tests.fixtures import make_tenant, reset_database, wait_for
from tests.integration.conftest import on_rabbitmq, redis_broker_only
from tests.integration.test_chaos import one_database

pytestmark = pytest.mark.integration

LIMIT_OPTION = "max_concurrent_provision_instance"


@dataclass
class System:
    """Worker processes, the database they share with this process, and the audit stream."""

    tmp_path: Path
    env: dict[str, str]
    workers: list[ManagedProcess] = field(default_factory=list)
    restarts: int = 0

    def __post_init__(self) -> None:
        self.stream = f"{os.environ['JOBS_NAMESPACE']}:audit"
        self.log = AuditLog(get_redis(), self.stream)

    def start_workers(self, count: int, threads: int = 8) -> None:
        self.workers = [self._start(i, threads) for i in range(count)]

    def _start(self, index: int, threads: int) -> ManagedProcess:
        name = f"worker{index}-{self.restarts}"
        return start_worker(
            name,
            queues=["default"],
            threads=threads,
            extra_modules=["benchmarks.workload"],
            env=self.env,
            log_path=self.tmp_path / f"{name}.log",
        )

    def kill_and_restart(self, index: int) -> None:
        """SIGKILL one worker's whole process group, record it in the audit, start a new one."""
        victim = self.workers[index]
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        victim.stop()
        self.log.record("kill", pid=victim.process.pid)
        self.restarts += 1
        self.workers[index] = self._start(index, threads=8)

    def stop(self) -> None:
        stop_all(self.workers)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp_path.glob("*.log")))


@pytest.fixture
def system(monkeypatch, tmp_path) -> Iterator[System]:
    monkeypatch.setenv("DATABASE_URL", one_database())  # one database per suite run: these are long
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}")
    monkeypatch.delenv("JOBS_BROKER")
    reset_database()
    previous = dramatiq.get_broker()
    dramatiq.set_broker(build_broker())
    system = System(tmp_path, env={})
    try:
        yield system
    finally:
        system.stop()
        dramatiq.set_broker(previous)


def _instances(tenants: Sequence[Any], per_tenant: int) -> list[Instance]:
    """``per_tenant`` instances in each tenant, inserted in one statement, in execution order."""
    rows = [
        {"uuid": uuid.uuid4().hex, "name": f"vm{i}", "service_settings_id": tenant.id, "flavor": "small"}
        for i in range(per_tenant)
        for tenant in tenants
    ]
    with session_scope() as session:
        session.execute(insert(Instance), rows)
    with session_scope() as session:
        by_uuid = {i.uuid: i for i in session.scalars(select(Instance))}
        for instance in by_uuid.values():
            _ = instance.service_settings  # loaded now, used after the session closed
    return [by_uuid[row["uuid"]] for row in rows]


def _scope(instance: Resource) -> str:
    return provisioning_scope(instance).key


def _ended(handles: Sequence[Any]) -> bool:
    ids = [h.id for h in handles]
    with session_scope() as session:
        running = session.scalar(
            select(Operation.id).where(Operation.id.in_(ids), Operation.status == "running").limit(1)
        )
        return running is None


def _statuses(handles: Sequence[Any]) -> set[str]:
    with session_scope() as session:
        return set(session.scalars(select(Operation.status).where(Operation.id.in_([h.id for h in handles]))))


def _trace(events, scope_of, timelines) -> str:
    """The events of the first scope over its limit, for the failure message."""
    scope = next(s for s, t in timelines.items() if t.violations)
    t0 = events[0].t_us
    lines = [f"{scope}: {timelines[scope].violations} violations, limit {timelines[scope].limit}"]
    for e in events:
        if e.kind == "kill" or scope_of.get(e.ref) == scope:
            lines.append(f"{(e.t_us - t0) / 1000:10.1f} {e.kind:5} {e.op[:8]} pid={e.pid} last={e.last} a={e.attempt}")
    return "\n".join(lines)


def _quiet(scopes: Sequence[str]) -> bool:
    store = find_throttle(dramatiq.get_broker()).store
    return all(not e.holders and not e.waiting for e in (store.explain(s) for s in scopes))


def test_the_limit_holds_exactly_while_workers_are_killed(system):
    # Given 12 tenants with limits 1-4, two worker processes, short leases, and a broker that puts a
    # dead worker's messages back within seconds
    system.env.update(
        JOBS_THROTTLE_LEASE_S="2",
        JOBS_THROTTLE_HEARTBEAT_S="0.5",
        JOBS_THROTTLE_HANDOFF_TIMEOUT_S="5",
        JOBS_BROKER_HEARTBEAT_TIMEOUT_MS="3000",
        JOBS_BROKER_MAINTENANCE_CHANCE="200000",
    )
    system.start_workers(2)
    rng = random.Random(20261121)
    limits = [1 + i % 4 for i in range(12)]
    tenants = [make_tenant(f"tenant{i}", options={LIMIT_OPTION: limit}) for i, limit in enumerate(limits)]
    instances = _instances(tenants, per_tenant=42)  # 504 operations

    # When 504 three-step operations with random durations, delays and failing-once steps are started
    handles = [
        AuditedExecutor.execute(
            instance,
            stream=system.stream,
            durations_ms=[rng.randint(10, 120) for _ in range(3)],
            delays_ms=[0, rng.randint(0, 150), rng.randint(0, 150)],
            fail_steps=[i for i in range(3) if rng.random() < 0.08],
        )
        for instance in instances
    ]
    # ... and every 1-2.5 s one worker is SIGKILLed and restarted, until all have ended
    deadline = time.monotonic() + 300
    kills = 0
    while not _ended(handles) and time.monotonic() < deadline:
        if kills < 15:
            time.sleep(rng.uniform(1, 2.5))  # the chaos schedule, not a synchronisation
            system.kill_and_restart(rng.randrange(2))
            kills += 1
        else:
            wait_for(lambda: _ended(handles), timeout_s=max(1, deadline - time.monotonic()))
    assert _ended(handles), f"operations still running after 300 s\n{system.logs()}"

    # Then every operation succeeded; none was lost or dropped
    assert _statuses(handles) == {"succeeded"}
    # ... and the auditor saw at no instant more operations active in a scope than its limit
    scope_of = {i.ref: _scope(i) for i in instances}
    limit_of = {_scope(instances[t]): limits[t] for t in range(len(tenants))}
    events = read_events(get_redis(), system.stream)
    timelines = audit(events, scope_of, limit_of)
    report = {s: (t.limit, t.max_active, t.violations) for s, t in timelines.items()}
    assert all(t.violations == 0 for t in timelines.values()), _trace(events, scope_of, timelines)
    if not on_rabbitmq():
        # ... and every slot was used. Not asserted on RabbitMQ: each worker prefetches several messages,
        # and a hand-off waiting behind a busy worker's prefetched steps can keep a small scope from ever
        # having all of its slots busy at once (the limit itself holds, asserted above).
        assert all(t.max_active == t.limit for t in timelines.values()), report
    assert sum(len(t.ended) for t in timelines.values()) == len(handles)
    # ... and at quiescence no slot is held and nobody waits
    wait_for(lambda: _quiet(list(limit_of)), timeout_s=30)
    assert kills >= 5


@redis_broker_only  # RabbitMQ gives the killed step back at once, so A keeps its slot and B rightly waits
def test_a_killed_workers_slot_is_reclaimed_within_lease_and_reaper_interval(system, capsys):
    # Given default leases, heartbeats and broker settings (a dead worker's messages come back after a
    # minute or more), one tenant with limit 1, and two workers: A's long step runs on one while B waits
    system.start_workers(2, threads=2)
    tenant = make_tenant("tenant", options={LIMIT_OPTION: 1})
    first, second = _instances([tenant], per_tenant=2)
    plan = {"stream": system.stream, "delays_ms": [0], "fail_steps": []}
    a = AuditedExecutor.execute(first, durations_ms=[120_000], **plan)
    b = AuditedExecutor.execute(second, durations_ms=[10], **plan)
    events = lambda: read_events(get_redis(), system.stream)  # noqa: E731
    wait_for(lambda: any(e.kind == "start" and e.op == a.id for e in events()), timeout_s=30)
    running_a = next(e.pid for e in events() if e.kind == "start" and e.op == a.id)

    # When the worker running A is SIGKILLed
    index = next(i for i, w in enumerate(system.workers) if w.process.pid == running_a)
    system.kill_and_restart(index)

    # Then B gets the slot and ends
    wait_for(lambda: _ended([b]), timeout_s=60)
    kill = next(e for e in events() if e.kind == "kill")
    b_start = next(e for e in events() if e.kind == "start" and e.op == b.id)
    recovery_s = (b_start.t_us - kill.t_us) / 1e6
    with capsys.disabled():
        print(f"\nslot of a SIGKILLed worker usable again after {recovery_s:.1f} s (lease 10 s + heartbeat 2 s)")
    a.cancel("test over")
    wait_for(lambda: _quiet([_scope(first)]), timeout_s=30)


def test_a_thousand_operations_on_one_slot_all_run_in_arrival_order_without_retries(system):
    # Given one tenant with limit 1 and two workers
    system.start_workers(2)
    tenant = make_tenant("tenant", options={LIMIT_OPTION: 1})
    instances = _instances([tenant], per_tenant=1000)

    # When 1,000 one-step operations are started at once
    handles = [
        AuditedExecutor.execute(instance, stream=system.stream, durations_ms=[0], delays_ms=[0])
        for instance in instances
    ]
    wait_for(lambda: _ended(handles), timeout_s=400)

    # Then all succeeded, one at a time, in the order they were started, each step on its first attempt
    assert _statuses(handles) == {"succeeded"}
    events = read_events(get_redis(), system.stream)
    scope = _scope(instances[0])
    timeline = audit(events, {i.ref: scope for i in instances}, {scope: 1})[scope]
    assert timeline.violations == 0
    assert [op for _t, op in timeline.activations] == [h.id for h in handles]
    assert {e.attempt for e in events if e.kind == "start"} == {0}
    assert len([e for e in events if e.kind == "start"]) == 1000


class _ForwardExecutor(AuditedExecutor):
    options = frozenset({"scopes"})

    @classmethod
    def throttle_scopes(cls, instance, **kwargs):
        return [ThrottleScope(kwargs["scopes"][0], 1), ThrottleScope(kwargs["scopes"][1], 1)]


class _BackwardExecutor(AuditedExecutor):
    options = frozenset({"scopes"})

    @classmethod
    def throttle_scopes(cls, instance, **kwargs):
        return [ThrottleScope(kwargs["scopes"][1], 1), ThrottleScope(kwargs["scopes"][0], 1)]


def test_operations_taking_two_scopes_in_opposite_orders_all_complete(system):
    # Given two scopes with limit 1 and two kinds of operation asking for them in opposite orders
    system.start_workers(2)
    scopes = [f"left-{uuid.uuid4().hex[:6]}", f"right-{uuid.uuid4().hex[:6]}"]
    tenant = make_tenant("tenant")
    instances = _instances([tenant], per_tenant=40)

    # When 40 of them, alternating kinds, are started at once
    handles = [
        (_ForwardExecutor if n % 2 else _BackwardExecutor).execute(
            instance, stream=system.stream, durations_ms=[5, 5], delays_ms=[0, 20], scopes=scopes
        )
        for n, instance in enumerate(instances)
    ]
    wait_for(lambda: _ended(handles), timeout_s=120)

    # Then all complete, and neither scope ever had two operations at once
    assert _statuses(handles) == {"succeeded"}
    timelines = audit(
        read_events(get_redis(), system.stream), {i.ref: scopes for i in instances}, dict.fromkeys(scopes, 1)
    )
    assert [t.violations for t in timelines.values()] == [0, 0]
    assert all(len(t.ended) == 40 for t in timelines.values())
    wait_for(lambda: _quiet(scopes), timeout_s=30)
