"""How promptly the per-scope throttle hands a freed slot to the next waiting operation, next to two common
alternatives, and what it costs.

Run from the repository root::

    python -m benchmarks.throttle            # a table
    python -m benchmarks.throttle --json     # one JSON object on stdout (progress goes to stderr)
    python -m benchmarks.throttle --quick    # a smaller scenario, about a minute

With REDIS_URL / DATABASE_URL set it uses those servers; otherwise it starts a private embedded Redis and
uses a temporary SQLite file. Its Redis keys live under a random ``JOBS_NAMESPACE`` of their own and are
deleted at the end, with its database rows, temporary files and every process it started (also on error
or Ctrl-C).

What is measured
----------------
**Hand-off scenario** (run three times, one after the other, each with fresh tenants, workers and audit
stream): N operations of three audited steps (see ``workload.py``: seeded durations of 300-500 ms and
delays of 100-200 ms between steps, identical for every variant) are submitted at once to one tenant whose
limit is L. The variants differ only in the throttle:

- ``ours``: the project's throttle (``AuditedExecutor``);
- ``waldur_style``: count the tenant's instances in CREATING, retry every 5 s while over the limit;
- ``dramatiq_rate_limiter``: Dramatiq's ConcurrentRateLimiter held from the first step to the last, with
  Dramatiq's default retries (backoff from 15 s).

Workers write every step's start and end to a Redis stream stamped by the server's clock; the figures come
from that stream only (``audit.py``, ``metrics.py``): hand-off latency from an operation's end to the next
waiting operation's start, the share of slot-time left idle while someone waited, the makespan against a
zero-gap schedule of the same operations, and activations over the limit.

**Isolation** (ours): the latency from submitting an operation on an idle tenant to its first step's start,
with 10,000 operations parked on another scope (straight through the throttle's store) versus none.

**Overhead** (ours): the throughput of short operations whose limit never binds, with the throttle on and
off (``JOBS_THROTTLE=off`` in the workers and in this process), alternated twice, best of each.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .entry import report

__all__ = ["Options", "main", "run"]

TARGETS: dict[str, float] = {
    "handoff_p99_ms": 25,
    "idle_slot_fraction": 0.01,
    "makespan_ratio": 1.05,
    "violations": 0,
    "overhead_ratio": 0.9,
}
#: The variants of the hand-off scenario: result key -> executor class in ``benchmarks.workload``.
VARIANTS = {
    "ours": "AuditedExecutor",
    "waldur_style": "WaldurStyleExecutor",
    "dramatiq_rate_limiter": "RateLimitedExecutor",
}
#: Step durations and delays between steps of the hand-off scenario, ms (seeded, the same per variant).
#: Short next to real provisioning (minutes), so every millisecond of hand-off shows.
STEP_MS = (300, 500)
DELAY_MS = (100, 200)
WORKER_PROCESSES = 2
WORKER_THREADS = 8
#: How long worker processes get to boot and poll the broker, seconds.
BOOT_TIMEOUT_S = 60.0
LIMIT_OPTION = "max_concurrent_provision_instance"
REPO_ROOT = Path(__file__).resolve().parent.parent

console = Console(stderr=True)


# -- options and workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    ops: int = 40
    limit: int = 4
    quick: bool = False
    json_output: bool = False
    seed: int = 7
    #: Longest wait for one batch of operations to end, seconds; a variant that takes longer is reported
    #: as timed out.
    timeout_s: float = 600.0
    overhead_ops: int = 200
    overhead_rounds: int = 2
    parked: int = 10_000
    probes: int = 20
    log_dir: Path | None = None


@dataclass(frozen=True)
class Workload:
    """Per operation: each step's duration, and the delay before each step (the first is never delayed)."""

    durations_ms: list[list[int]]
    delays_ms: list[list[int]]

    def __len__(self) -> int:
        return len(self.durations_ms)

    def kwargs(self, index: int, stream: str) -> dict[str, Any]:
        return {
            "stream": stream,
            "durations_ms": self.durations_ms[index],
            "delays_ms": self.delays_ms[index],
            "fail_steps": (),
        }


def random_workload(
    ops: int, seed: int, duration_ms: tuple[int, int], delay_ms: tuple[int, int], steps: int = 3
) -> Workload:
    rng = random.Random(seed)
    durations = [[rng.randint(*duration_ms) for _ in range(steps)] for _ in range(ops)]
    delays = [[0] + [rng.randint(*delay_ms) for _ in range(steps - 1)] for _ in range(ops)]
    return Workload(durations, delays)


def scenario_workload(options: Options) -> Workload:
    return random_workload(options.ops, options.seed, duration_ms=STEP_MS, delay_ms=DELAY_MS)


def overhead_workload(ops: int, seed: int) -> Workload:
    return random_workload(ops, seed, duration_ms=(5, 20), delay_ms=(0, 0))


# -- the environment: Redis, database, namespace ---------------------------------------------------------


@dataclass
class Environment:
    """Where this run keeps its things, and what it created (to delete at the end)."""

    directory: Path
    namespace: str
    redis: str
    database: str
    tenant_ids: list[int] = field(default_factory=list)
    log_reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    def stream(self, name: str) -> str:
        return f"{self.namespace}:audit:{name}"


def prepare_environment(stack: ExitStack) -> Environment:
    """Set the environment variables every part reads, starting an embedded Redis if none is configured.
    Everything is undone when ``stack`` closes."""
    saved = dict(os.environ)
    stack.callback(_restore_environment, saved)
    directory = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    stack.callback(shutil.rmtree, directory, True)
    redis_kind = "external"
    if not os.environ.get("REDIS_URL"):
        from jobs.embedded_redis import EmbeddedRedis

        os.environ["REDIS_URL"] = stack.enter_context(EmbeddedRedis())
        redis_kind = "embedded"
    if not os.environ.get("DATABASE_URL"):
        os.environ["DATABASE_URL"] = f"sqlite:///{directory / 'bench.sqlite3'}"
    namespace = f"jobs-bench-{uuid.uuid4().hex[:8]}"
    os.environ["JOBS_NAMESPACE"] = namespace
    os.environ["JOBS_THROTTLE"] = "on"
    os.environ.pop("JOBS_BROKER", None)  # this process and its workers use the real broker
    # Worker processes import benchmarks.workload, which is not an installed package.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    database = os.environ["DATABASE_URL"].split(":", 1)[0].split("+", 1)[0]
    return Environment(directory, namespace, redis_kind, database)


def _restore_environment(saved: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(saved)


def clean_up(environment: Environment) -> None:
    """Delete this run's Redis keys and database rows."""
    from resources.db import get_engine
    from resources.redis_client import get_redis

    client = get_redis()
    keys = list(client.scan_iter(f"{environment.namespace}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    _delete_rows(environment.tenant_ids)
    get_engine().dispose()


def _delete_rows(tenant_ids: list[int]) -> None:
    from sqlalchemy import delete, select

    from resources.db import session_scope
    from resources.models import Instance, Operation, ServiceSettings, StepDone

    for start in range(0, len(tenant_ids), 100):
        chunk = tenant_ids[start : start + 100]
        with session_scope() as session:
            refs = [
                f"instance:{u}"
                for u in session.scalars(select(Instance.uuid).where(Instance.service_settings_id.in_(chunk)))
            ]
            for first in range(0, len(refs), 500):
                operations = select(Operation.id).where(Operation.resource_ref.in_(refs[first : first + 500]))
                session.execute(delete(StepDone).where(StepDone.operation_id.in_(operations)))
                session.execute(delete(Operation).where(Operation.resource_ref.in_(refs[first : first + 500])))
            session.execute(delete(Instance).where(Instance.service_settings_id.in_(chunk)))
            session.execute(delete(ServiceSettings).where(ServiceSettings.id.in_(chunk)))


# -- tenants, workers, submitting and waiting ------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    """A service settings row (one throttle scope) and its instances."""

    id: int
    limit: int
    scope_key: str
    instance_ids: list[int]
    refs: list[str]


def create_tenant(environment: Environment, label: str, *, limit: int, instances: int) -> Tenant:
    from jobs.executors.throttling import provisioning_scope
    from resources.db import session_scope
    from resources.models import Instance, ServiceSettings

    name = f"{environment.namespace}-{label}"
    with session_scope() as session:
        tenant = ServiceSettings(name=name, backend="simulated", options={LIMIT_OPTION: limit})
        rows = [Instance(name=f"{name}-vm-{i + 1}", service_settings=tenant) for i in range(instances)]
        session.add_all([tenant, *rows])
        session.flush()
        environment.tenant_ids.append(tenant.id)
        return Tenant(
            tenant.id, limit, provisioning_scope(rows[0]).key, [row.id for row in rows], [row.ref for row in rows]
        )


def executor_class(name: str) -> Any:
    from benchmarks import workload

    return getattr(workload, name)


def submit_batch(executor: Any, instance_ids: Sequence[int], workload: Workload, stream: str) -> list[str]:
    """Start operation i on instance i, all in one transaction: every first step is sent at once, on commit.
    Returns the operation ids."""
    from sqlalchemy import select

    from resources.db import session_scope
    from resources.models import Instance

    with session_scope() as session:
        by_id = {row.id: row for row in session.scalars(select(Instance).where(Instance.id.in_(instance_ids)))}
        handles = [
            executor.execute(by_id[instance_id], **workload.kwargs(index, stream))
            for index, instance_id in enumerate(instance_ids)
        ]
    return [handle.id for handle in handles]


def wait_for_operations(operation_ids: Sequence[str], stream: str, timeout_s: float) -> tuple[Counter[str], bool]:
    """Wait until every operation has ended. Returns their statuses and whether the wait timed out.

    It follows the audit stream (Redis) and asks the database only about once a second until the audit
    has seen every last step end: on SQLite every transaction takes the write lock, so polling the
    database all along would slow the very steps being measured."""
    deadline = time.monotonic() + timeout_s
    wait_for_audited_ends(operation_ids, stream, deadline)
    while True:
        statuses = operation_statuses(operation_ids)
        if statuses["running"] == 0:
            return statuses, False
        if time.monotonic() > deadline:
            return statuses, True
        time.sleep(0.05)


def wait_for_audited_ends(operation_ids: Sequence[str], stream: str, deadline: float) -> None:
    """Read the audit stream as it grows until each operation's last step has ended, the database says
    none is running any more (e.g. one failed before any step), or the deadline."""
    from resources.redis_client import get_redis

    client = get_redis()
    waiting, after = set(operation_ids), "-"
    next_database_check = time.monotonic() + 1.0
    while waiting and time.monotonic() < deadline:
        entries = client.xrange(stream, min=after, count=1000)
        for entry_id, fields in entries:
            after = f"({entry_id}"
            if fields.get("kind") == "end" and fields.get("last") == "1":
                waiting.discard(fields.get("op"))
        if time.monotonic() > next_database_check:
            if operation_statuses(operation_ids)["running"] == 0:
                return
            next_database_check = time.monotonic() + 1.0
        if len(entries) < 1000:
            time.sleep(0.05)


def require_success(what: str, statuses: Counter[str], timed_out: bool) -> None:
    """Operations that only prepare a measurement must all succeed; otherwise the workers are broken."""
    if timed_out or set(statuses) != {"succeeded"}:
        raise RuntimeError(
            f"{what}: operations ended {dict(statuses)}{' (timed out)' if timed_out else ''}; "
            "run with --log-dir to keep the worker logs and look there"
        )


def operation_statuses(operation_ids: Sequence[str]) -> Counter[str]:
    from sqlalchemy import select

    from resources.db import session_scope
    from resources.models import Operation

    with session_scope() as session:
        return Counter(session.scalars(select(Operation.status).where(Operation.id.in_(operation_ids))))


@contextmanager
def phase(environment: Environment, name: str, *, throttle: bool = True) -> Iterator[None]:
    """Fresh worker processes (and a fresh broker here) with the throttle on or off, booted and warmed up."""
    import dramatiq

    from jobs.broker import build_broker
    from jobs.processes import start_worker

    switch = "on" if throttle else "off"
    os.environ["JOBS_THROTTLE"] = switch  # read by Throttle() when the broker is built, here and in workers
    previous = dramatiq.get_broker()
    broker = build_broker()
    dramatiq.set_broker(broker)
    log_path = environment.logs / f"{name}.log"
    worker = start_worker(
        "bench",
        queues=["default"],
        processes=WORKER_PROCESSES,
        threads=WORKER_THREADS,
        extra_modules=["benchmarks.workload"],
        env={"JOBS_THROTTLE": switch},
        log_path=log_path,
    )
    booting = time.monotonic()
    try:
        wait_until_polling(environment, broker, started_ms=time.time() * 1000 - 1000)
        warm_up(environment, name)
        console.print(
            f"{name}: {WORKER_PROCESSES} worker processes ready and warm in {time.monotonic() - booting:.1f} s"
        )
        yield
    finally:
        worker.stop()
        environment.log_reports[name] = summarize_log(log_path)
        dramatiq.set_broker(previous)
        broker.close()
        os.environ["JOBS_THROTTLE"] = "on"


def wait_until_polling(environment: Environment, broker: Any, started_ms: float) -> None:
    """Wait until every worker process polls the broker. Dramatiq's Redis broker stamps each process's
    polls in a ``__heartbeats__`` set (this process's own broker too, when it sends)."""
    from resources.redis_client import get_redis

    key = f"{environment.namespace}:dramatiq:__heartbeats__"
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        recent = get_redis().zrangebyscore(key, started_ms, "+inf")
        if len(set(recent) - {broker.broker_id}) >= WORKER_PROCESSES:
            return
        time.sleep(0.1)
    console.print(f"[yellow]not all {WORKER_PROCESSES} worker processes polled within {BOOT_TIMEOUT_S} s[/]")


def warm_up(environment: Environment, name: str) -> None:
    """A batch of short operations through every worker thread: database connections, imports, scripts."""
    count = 2 * WORKER_PROCESSES * WORKER_THREADS
    tenant = create_tenant(environment, f"warm-up-{name}", limit=count, instances=count)
    workload = overhead_workload(count, seed=0)
    stream = environment.stream(f"{name}-warm-up")
    ids = submit_batch(executor_class("AuditedExecutor"), tenant.instance_ids, workload, stream)
    require_success(f"the warm-up of {name}", *wait_for_operations(ids, stream, BOOT_TIMEOUT_S))


# -- worker logs -------------------------------------------------------------------------------------------

_LEVEL = re.compile(r"\[(WARNING|ERROR|CRITICAL)\] (.*)$")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exceeded|Unavailable|Timeout|Interrupt)): ")
_VARIABLE = re.compile(r"[0-9a-f]{32}|[0-9a-f-]{36}|\d+")


def summarize_log(path: Path, top: int = 5) -> dict[str, Any]:
    """Warnings, errors and exception types in a worker log, with its most frequent messages."""
    if not path.exists():
        return {"warnings": 0, "errors": 0, "exceptions": {}, "top": []}
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        level = _LEVEL.search(line)
        if level:
            levels[level.group(1)] += 1
            messages[f"{level.group(1)} {_VARIABLE.sub('#', level.group(2))[:160]}"] += 1
        exception = _EXCEPTION.match(line)
        if exception:
            exceptions[exception.group(1)] += 1
    return {
        "warnings": levels["WARNING"],
        "errors": levels["ERROR"] + levels["CRITICAL"],
        "exceptions": dict(exceptions),
        "top": [[message, count] for message, count in messages.most_common(top)],
    }


# -- the hand-off scenario ---------------------------------------------------------------------------------


def run_variant(environment: Environment, name: str, options: Options, workload: Workload) -> dict[str, Any]:
    from benchmarks.audit import audit, read_events
    from resources.redis_client import get_redis

    stream = environment.stream(name)
    with phase(environment, name):
        tenant = create_tenant(environment, name, limit=options.limit, instances=len(workload))
        console.print(f"{name}: {len(workload)} operations, limit {options.limit}")
        started = time.monotonic()
        ids = submit_batch(executor_class(VARIANTS[name]), tenant.instance_ids, workload, stream)
        statuses, timed_out = wait_for_operations(ids, stream, options.timeout_s)
        wall_s = time.monotonic() - started
    events = read_events(get_redis(), stream)
    timeline = audit(events, dict.fromkeys(tenant.refs, name), {name: options.limit})[name]
    figures = variant_figures(timeline, statuses, timed_out)
    console.print(f"{name}: done in {wall_s:.1f} s")
    return figures


def variant_figures(timeline: Any, statuses: Counter[str], timed_out: bool) -> dict[str, Any]:
    from benchmarks.metrics import handoff_samples_ms, idle_slot_fraction, makespan_ratio, makespan_us, summarize_ms

    idle = idle_slot_fraction(timeline)
    ratio = makespan_ratio(timeline)
    makespan = makespan_us(timeline)
    return {
        "operations": sum(statuses.values()),
        "ended": len(timeline.ended),
        "timed_out": timed_out,
        "statuses": dict(statuses),
        "limit": timeline.limit,
        "max_active": timeline.max_active,
        "violations": timeline.violations,
        "handoff_ms": summarize_ms(handoff_samples_ms(timeline)),
        "idle_slot_fraction": None if idle is None else round(idle, 4),
        "makespan_ratio": None if ratio is None else round(ratio, 3),
        "makespan_s": None if makespan is None else round(makespan / 1e6, 2),
    }


# -- isolation ---------------------------------------------------------------------------------------------


class ParkedCrowd:
    """Operations parked on a scope of their own, straight through the throttle's store: one synthetic
    holder takes the only slot (with no lease expiry, so the reaper leaves it alone) and ``count`` more wait
    behind it. Their "messages" are not messages: should one ever be handed its slot, sending it fails."""

    def __init__(self, store: Any, count: int) -> None:
        from middleware import ThrottleScope

        run = uuid.uuid4().hex[:8]
        self.store = store
        self.scope = ThrottleScope(f"bench:isolation:{run}", 1)
        self.holder = f"bench-holder-{run}"
        self.waiters = [f"bench-parked-{run}-{i}" for i in range(count)]

    def park(self) -> None:
        if self.store.acquire(self.holder, [self.scope], start=True).status != "granted":
            raise RuntimeError(f"the synthetic holder of {self.scope.key} was not granted")
        self.store.mark_queued([self.holder])
        for op in self.waiters:
            admission = self.store.acquire(op, [self.scope], start=False, messages=[(0, "x")])
            if admission.status != "parked" or admission.handoffs:
                raise RuntimeError(f"synthetic operation {op} was {admission.status}, not parked")

    def intact(self) -> bool:
        """Still exactly the holder holding and every waiter waiting."""
        explanation = self.store.explain(self.scope.key, max_waiters=1)
        holders = [holder.operation_id for holder in explanation.holders]
        sample = random.Random(0).sample(self.waiters, min(100, len(self.waiters)))
        waiting = all(self.store.state_of(op) == "waiting" for op in sample)
        return holders == [self.holder] and explanation.waiting == len(self.waiters) and waiting

    def clear(self) -> int:
        """Release the waiters, then the holder. Returns how many hand-offs that caused (must be 0)."""
        handoffs = sum(len(self.store.release(op)) for op in self.waiters)
        return handoffs + len(self.store.release(self.holder))


def measure_isolation(environment: Environment, options: Options) -> dict[str, Any]:
    """Probe latencies on an idle tenant with nobody parked (before and after, against drift) and with
    ``options.parked`` operations parked on another scope."""
    import dramatiq

    from middleware import find_throttle

    probes = options.probes
    with phase(environment, "isolation"):
        tenant = create_tenant(environment, "isolation", limit=options.limit, instances=3 * probes)
        batches = [tenant.refs[i * probes : (i + 1) * probes] for i in range(3)]
        empty = probe_latencies_ms(environment, batches[0], tenant.instance_ids, "empty-before")
        throttle = find_throttle(dramatiq.get_broker())
        assert throttle is not None
        crowd = ParkedCrowd(throttle.store, options.parked)
        console.print(f"isolation: parking {options.parked} operations on another scope")
        try:
            crowd.park()
            parked = probe_latencies_ms(environment, batches[1], tenant.instance_ids, "parked")
            intact = crowd.intact()
        finally:
            stray = crowd.clear()
        empty += probe_latencies_ms(environment, batches[2], tenant.instance_ids, "empty-after")
    empty_p50, parked_p50 = _median(empty), _median(parked)
    return {
        "parked": options.parked,
        "probes": {"empty": len(empty), "parked": len(parked)},
        "empty_p50_ms": round(empty_p50, 1),
        "parked_p50_ms": round(parked_p50, 1),
        "ratio": round(parked_p50 / empty_p50, 2) if empty_p50 > 0 else None,
        "parked_stayed_parked": intact and stray == 0,
    }


def _median(values: Sequence[float]) -> float:
    from benchmarks.metrics import percentile

    value = percentile(values, 0.5)
    return 0.0 if value is None else value


def probe_latencies_ms(
    environment: Environment, refs: Sequence[str], instance_ids: Sequence[int], label: str
) -> list[float]:
    """One operation at a time on the idle tenant: server time from just before ``execute`` (which commits
    and sends) to its first step's start."""
    from sqlalchemy import select

    from benchmarks.audit import AuditLog, read_events
    from resources.db import session_scope
    from resources.models import Instance
    from resources.redis_client import get_redis

    stream = environment.stream(f"isolation-{label}")
    log = AuditLog(get_redis(), stream)
    executor = executor_class("AuditedExecutor")
    with session_scope() as session:
        instances = {row.ref: row for row in session.scalars(select(Instance).where(Instance.id.in_(instance_ids)))}
    for ref in refs:
        log.record("submit", ref=ref)
        handle = executor.execute(instances[ref], stream=stream, durations_ms=[10, 10, 10], delays_ms=[0, 0, 0])
        require_success(f"isolation probe {label}", *wait_for_operations([handle.id], stream, BOOT_TIMEOUT_S))
    submitted: dict[str, int] = {}
    started: dict[str, int] = {}
    for event in read_events(get_redis(), stream):
        if event.kind == "submit":
            submitted[event.ref] = event.t_us
        elif event.kind == "start":
            started.setdefault(event.ref, event.t_us)
    return [(started[ref] - submitted[ref]) / 1000 for ref in refs if ref in started]


# -- overhead ----------------------------------------------------------------------------------------------


def measure_overhead(environment: Environment, options: Options) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(options.overhead_rounds):
        for switch in ("on", "off"):
            name = f"overhead-{switch}-{round_ + 1}"
            with phase(environment, name, throttle=switch == "on"):
                rate = throughput(environment, name, options)
            console.print(f"{name}: {rate:.1f} operations/s")
            runs[switch].append(round(rate, 1))
    best_on, best_off = max(runs["on"]), max(runs["off"])
    return {
        "ops": options.overhead_ops,
        "on_ops_per_s": best_on,
        "off_ops_per_s": best_off,
        "ratio": round(best_on / best_off, 3) if best_off else None,
        "runs": runs,
    }


def throughput(environment: Environment, name: str, options: Options) -> float:
    """Operations per second, from just before submitting them all (server time) to the last one's end.
    Four tenants, each with a limit above the number of operations: the throttle never makes one wait."""
    from benchmarks.audit import AuditLog, read_events
    from resources.redis_client import get_redis

    ops = options.overhead_ops
    tenants = [create_tenant(environment, f"{name}-{i}", limit=ops, instances=ops // 4 + 1) for i in range(4)]
    instance_ids = [tenants[i % 4].instance_ids[i // 4] for i in range(ops)]
    workload = overhead_workload(ops, options.seed)
    stream = environment.stream(f"{name}-measured")
    AuditLog(get_redis(), stream).record("submit")
    ids = submit_batch(executor_class("AuditedExecutor"), instance_ids, workload, stream)
    require_success(name, *wait_for_operations(ids, stream, options.timeout_s))
    events = read_events(get_redis(), stream)
    submitted = next(event.t_us for event in events if event.kind == "submit")
    last_end = max(event.t_us for event in events if event.kind == "end" and event.last)
    return ops / ((last_end - submitted) / 1e6)


# -- the run -----------------------------------------------------------------------------------------------


def run(options: Options) -> dict[str, Any]:
    started = time.monotonic()
    with ExitStack() as stack:
        environment = prepare_environment(stack)
        # Imported only now: the project's modules read REDIS_URL and the namespace when they are imported.
        from resources.db import create_schema

        stack.callback(_keep_logs, environment, options.log_dir)
        create_schema()
        stack.callback(clean_up, environment)
        workload = scenario_workload(options)
        result: dict[str, Any] = {
            "scenario": scenario_summary(options, workload),
            "targets": TARGETS,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "redis": environment.redis,
                "database": environment.database,
                # Other work on the machine skews every figure here: worth a look before comparing runs.
                "load_average_at_start": round(os.getloadavg()[0], 2),
            },
        }
        for name in VARIANTS:
            result[name] = run_variant(environment, name, options, workload)
        result["isolation"] = measure_isolation(environment, options)
        result["overhead"] = measure_overhead(environment, options)
        result["ours_meets_targets"] = check_targets(result)
        result["worker_logs"] = environment.log_reports
    result["duration_s"] = round(time.monotonic() - started, 1)
    return result


def _keep_logs(environment: Environment, log_dir: Path | None) -> None:
    if log_dir is not None and environment.logs.exists():
        shutil.copytree(environment.logs, log_dir, dirs_exist_ok=True)


def scenario_summary(options: Options, workload: Workload) -> dict[str, Any]:
    return {
        "ops": options.ops,
        "limit": options.limit,
        "steps": 3,
        "durations_ms": list(STEP_MS),
        "delays_ms": list(DELAY_MS),
        "seed": options.seed,
        "total_step_ms": sum(map(sum, workload.durations_ms)),
        "workers": {"processes": WORKER_PROCESSES, "threads": WORKER_THREADS},
    }


def check_targets(result: dict[str, Any]) -> dict[str, bool]:
    ours = result["ours"]

    def at_most(value: float | None, target: float) -> bool:
        return value is not None and value <= target

    return {
        "handoff_p99_ms": at_most(ours["handoff_ms"]["p99"], TARGETS["handoff_p99_ms"]),
        "idle_slot_fraction": at_most(ours["idle_slot_fraction"], TARGETS["idle_slot_fraction"]),
        "makespan_ratio": at_most(ours["makespan_ratio"], TARGETS["makespan_ratio"]),
        "violations": ours["violations"] == TARGETS["violations"],
        "overhead_ratio": (result["overhead"]["ratio"] or 0) >= TARGETS["overhead_ratio"],
    }


# -- output ------------------------------------------------------------------------------------------------


def render(result: dict[str, Any], out: Console) -> None:
    out.print(scenario_table(result))
    isolation, overhead = result["isolation"], result["overhead"]
    out.print(
        f"isolation: first step starts {isolation['empty_p50_ms']} ms after submit on an empty system, "
        f"{isolation['parked_p50_ms']} ms with {isolation['parked']} operations parked elsewhere "
        f"(ratio {isolation['ratio']}; parked ones stayed parked: {isolation['parked_stayed_parked']})"
    )
    out.print(
        f"overhead: {overhead['on_ops_per_s']} operations/s with the throttle on, {overhead['off_ops_per_s']} "
        f"off (ratio {overhead['ratio']}, target ≥ {TARGETS['overhead_ratio']})"
    )
    errors = {name: report["errors"] for name, report in result["worker_logs"].items() if report["errors"]}
    out.print(f"worker log errors: {errors or 'none'}; run took {result['duration_s']} s")


def scenario_table(result: dict[str, Any]) -> Table:
    scenario = result["scenario"]
    table = Table(
        title=f"throttle hand-off: {scenario['ops']} operations, limit {scenario['limit']}", title_justify="left"
    )
    table.add_column("figure")
    for name in VARIANTS:
        table.add_column(name, justify="right")
    table.add_column("target (ours)", justify="right")
    rows = [
        ("hand-off p50 ms", lambda v: v["handoff_ms"]["p50"], ""),
        ("hand-off p99 ms", lambda v: v["handoff_ms"]["p99"], f"≤ {TARGETS['handoff_p99_ms']}"),
        ("hand-off max ms", lambda v: v["handoff_ms"]["max"], ""),
        ("idle slot fraction", lambda v: v["idle_slot_fraction"], f"≤ {TARGETS['idle_slot_fraction']}"),
        ("makespan ratio", lambda v: v["makespan_ratio"], f"≤ {TARGETS['makespan_ratio']}"),
        ("makespan s", lambda v: v["makespan_s"], ""),
        ("max active", lambda v: v["max_active"], ""),
        ("violations", lambda v: v["violations"], f"= {TARGETS['violations']}"),
        ("ended / operations", lambda v: f"{v['ended']} / {v['operations']}", ""),
    ]
    for label, value, target in rows:
        table.add_row(label, *(str(value(result[name])) for name in VARIANTS), target)
    return table


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throttle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quick", action="store_true", help="a smaller scenario, for a smoke run")
    parser.add_argument("--ops", type=int, help="operations in the hand-off scenario (default 40; quick 16)")
    parser.add_argument("--limit", type=int, help="the scope's limit (default 4; quick 2)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the step durations and delays")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for one variant, seconds")
    parser.add_argument("--log-dir", type=Path, help="keep the worker logs in this directory")
    args = parser.parse_args(argv)
    quick = args.quick
    options = Options(
        ops=args.ops or (16 if quick else 40),
        limit=args.limit or (2 if quick else 4),
        quick=quick,
        json_output=args.json,
        seed=args.seed,
        timeout_s=args.timeout,
        overhead_ops=80 if quick else 200,
        probes=10 if quick else 20,
        log_dir=args.log_dir,
    )
    if options.ops < 1 or options.limit < 1:
        parser.error("--ops and --limit must be positive")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    return report(lambda: run(options), json_output=options.json_output, render=render)


if __name__ == "__main__":
    sys.exit(main())
