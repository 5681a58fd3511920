"""``jobs demo``: real operations through real workers, on a simulated cloud with injected failures.

It provisions instances with volumes across several tenants, resizes some, deletes them all, and
checks every operation's outcome against what the seeded failure injection says it must be.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter, defaultdict
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .embedded_redis import EmbeddedRedis
from .processes import start_worker

__all__ = ["DemoOptions", "run_demo"]

#: How long one phase may take before its unfinished operations count as unexpected, seconds.
PHASE_TIMEOUT_S = 180.0
FAILURE_KEYS = (
    "instance.create",
    "instance.boot",
    "volume.create",
    "instance.resize",
    "instance.delete",
    "volume.delete",
)


@dataclass
class DemoOptions:
    instances: int = 12
    tenants: int = 3
    failure_rate: float = 0.05
    seed: int = 7
    json_output: bool = False


@dataclass
class Planned:
    """An operation the demo started, and the outcome the failure injection says it must have."""

    executor: str
    resource: str
    operation_id: str
    expected: str
    outcome: str = "running"
    error: str = ""


@dataclass
class Report:
    planned: list[Planned] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    final_states: Counter[str] = field(default_factory=Counter)


def run_demo(options: DemoOptions, console: Console) -> dict[str, Any]:
    started = time.monotonic()
    namespace = f"jobs-demo-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        if not os.environ.get("REDIS_URL"):
            os.environ["REDIS_URL"] = stack.enter_context(EmbeddedRedis())
        # A namespace of its own: the demo never touches real queues on a shared Redis.
        os.environ["JOBS_NAMESPACE"] = namespace
        os.environ.setdefault("JOBS_POLL_INTERVAL_S", "0.25")
        # Imported only now: the broker binds to the Redis URL and namespace at import.
        from resources.backends import SimulatedCloud, SimulatedConfig
        from resources.db import migrate
        from resources.redis_client import get_redis

        from . import app  # noqa: F401  (declares the actors on the broker)

        migrate()  # the same migrations as a release: a data directory from an older version is upgraded
        cloud = SimulatedCloud()
        config = SimulatedConfig(
            latency_ms=(20, 120),
            build_ms=800,
            delete_ms=400,
            seed=options.seed,
            failures={key: options.failure_rate for key in FAILURE_KEYS},
        )
        cloud.configure(config)
        stack.callback(_delete_namespace, get_redis(), namespace)
        from resources.config import get_settings

        logs = get_settings().data_dir / "logs"
        workers = [
            start_worker("worker", queues=["default"], threads=8, log_path=logs / "demo-worker.log"),
            start_worker("heavy", queues=["heavy"], threads=1, prefetch=1, log_path=logs / "demo-heavy.log"),
        ]
        for worker in workers:
            stack.callback(worker.stop)
        report = _run_phases(options, cloud, config, console)
        return _summary(options, report, time.monotonic() - started, [w.log_path for w in workers])


def _delete_namespace(client: Any, namespace: str) -> None:
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


def _run_phases(options: DemoOptions, cloud: Any, config: Any, console: Console) -> Report:
    from sqlalchemy import select

    from resources.db import session_scope
    from resources.models import Instance, ServiceSettings, Volume
    from resources.states import State

    from .executors import InstanceCreateExecutor, InstanceDeleteExecutor, InstanceResizeExecutor

    rng = random.Random(options.seed)
    run = uuid.uuid4().hex[:6]
    report = Report()
    with session_scope() as session:
        tenants = [
            ServiceSettings(
                name=f"demo-{run}-tenant-{i + 1}", backend="simulated", options={"max_concurrent_provision_instance": 4}
            )
            for i in range(options.tenants)
        ]
        session.add_all(tenants)
        session.flush()
        instances = []
        for index in range(options.instances):
            tenant = tenants[index % len(tenants)]
            instance = Instance(name=f"demo-{run}-vm-{index + 1:02d}", service_settings_id=tenant.id)
            instance.volumes = [
                Volume(
                    name=f"{instance.name}-disk-{v + 1}",
                    size_gb=rng.choice([10, 20, 50]),
                    service_settings_id=tenant.id,
                )
                for v in range(rng.randint(1, 2))
            ]
            instances.append(instance)
        session.add_all(instances)
    refs = {i.uuid: (i.name, [v.uuid for v in i.volumes]) for i in instances}

    def fails(key: str, uuid_: str) -> bool:
        return cloud.will_fail(key, uuid_, config)

    def expect(failed: bool) -> str:
        return "failed" if failed else "succeeded"

    # Phase 1: provision every instance with its volumes.
    ours = select(Instance).where(Instance.uuid.in_(refs)).order_by(Instance.id)
    with session_scope() as session:
        for instance in session.scalars(ours):
            volumes = refs[instance.uuid][1]
            failed = (
                fails("instance.create", instance.uuid)
                or fails("instance.boot", instance.uuid)
                or any(fails("volume.create", v) for v in volumes)
            )
            handle = InstanceCreateExecutor.execute(instance)
            report.planned.append(Planned("InstanceCreateExecutor", instance.name, handle.id, expect(failed)))
    _wait_phase("provision", report, refs, console, options)

    # Phase 2: resize every other instance that is OK (on the heavy queue).
    with session_scope() as session:
        for instance in session.scalars(ours.where(Instance.state == State.OK)).all()[::2]:
            handle = InstanceResizeExecutor.execute(instance, flavor="large")
            report.planned.append(
                Planned(
                    "InstanceResizeExecutor", instance.name, handle.id, expect(fails("instance.resize", instance.uuid))
                )
            )
    _wait_phase("resize", report, refs, console, options)

    # Phase 3: delete everything that is left (each volume's delete is a stage of its instance's).
    with session_scope() as session:
        for instance in session.scalars(ours):
            volumes = [v.uuid for v in instance.volumes]
            failed = fails("instance.delete", instance.uuid) or any(fails("volume.delete", v) for v in volumes)
            handle = InstanceDeleteExecutor.execute(instance)
            report.planned.append(Planned("InstanceDeleteExecutor", instance.name, handle.id, expect(failed)))
    _wait_phase("delete", report, refs, console, options)
    report.final_states = _resource_states(refs)
    return report


def _resource_states(refs: dict[str, tuple[str, list[str]]]) -> Counter[str]:
    from sqlalchemy import select

    from resources.db import session_scope
    from resources.models import Instance, Volume

    volume_uuids = [v for _name, volumes in refs.values() for v in volumes]
    with session_scope() as session:
        states = Counter(str(s) for s in session.scalars(select(Instance.state).where(Instance.uuid.in_(refs))))
        states.update(str(s) for s in session.scalars(select(Volume.state).where(Volume.uuid.in_(volume_uuids))))
    total = len(refs) + len(volume_uuids)
    states["deleted"] = total - sum(states.values())
    return +states


def _refresh_outcomes(report: Report) -> None:
    from sqlalchemy import select

    from resources.db import session_scope
    from resources.models import Operation

    pending = {p.operation_id: p for p in report.planned if p.outcome == "running"}
    if not pending:
        return
    with session_scope() as session:
        rows = session.execute(
            select(Operation.id, Operation.status, Operation.error_message).where(Operation.id.in_(pending))
        )
        for operation_id, status, error in rows:
            pending[operation_id].outcome = status
            pending[operation_id].error = error


def _progress_table(phase: str, report: Report, states: Counter[str]) -> Table:
    table = Table(title=f"jobs demo — {phase}", title_justify="left")
    table.add_column("executor")
    for column in ("running", "succeeded", "failed"):
        table.add_column(column, justify="right")
    by_executor: dict[str, Counter[str]] = defaultdict(Counter)
    for planned in report.planned:
        by_executor[planned.executor][planned.outcome] += 1
    for executor, counts in by_executor.items():
        table.add_row(executor, *(str(counts[c]) for c in ("running", "succeeded", "failed")))
    table.caption = "resources: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
    return table


def _wait_phase(
    phase: str, report: Report, refs: dict[str, tuple[str, list[str]]], console: Console, options: DemoOptions
) -> None:
    from resources.states import TRANSITIONAL_STATES

    transitional = {str(s) for s in TRANSITIONAL_STATES}
    started = time.monotonic()
    live = None if options.json_output else Live(console=console, refresh_per_second=8)
    with live or nullcontext():
        while True:
            _refresh_outcomes(report)
            states = _resource_states(refs)
            if live is not None:
                live.update(_progress_table(phase, report, states))
            settled = not any(s in transitional for s in states)
            if settled and all(p.outcome != "running" for p in report.planned):
                break
            if time.monotonic() - started > PHASE_TIMEOUT_S:
                break
            time.sleep(0.2)
    report.phases[phase] = round(time.monotonic() - started, 2)


def _summary(options: DemoOptions, report: Report, duration: float, logs: list[Any]) -> dict[str, Any]:
    operations: dict[str, dict[str, int]] = defaultdict(lambda: {"succeeded": 0, "failed": 0, "running": 0})
    unexpected = []
    for planned in report.planned:
        operations[planned.executor][planned.outcome] += 1
        if planned.outcome != planned.expected:
            unexpected.append(
                {
                    "executor": planned.executor,
                    "resource": planned.resource,
                    "expected": planned.expected,
                    "outcome": planned.outcome,
                    "error": planned.error,
                }
            )
    failures = [
        {"executor": p.executor, "resource": p.resource, "error": p.error}
        for p in report.planned
        if p.outcome == "failed"
    ]
    return {
        "resources": dict(report.final_states),
        "operations": {k: dict(v) for k, v in operations.items()},
        "unexpected": len(unexpected),
        "unexpected_operations": unexpected,
        "failures": failures,
        "phases_s": report.phases,
        "duration_s": round(duration, 2),
        "settings": {
            "instances": options.instances,
            "tenants": options.tenants,
            "failure_rate": options.failure_rate,
            "seed": options.seed,
        },
        "worker_logs": [str(p) for p in logs],
    }
