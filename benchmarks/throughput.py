"""Throughput of a five-step no-op operation on plain Dramatiq, on this project's executors, and on Celery.

Run from the repository root (Celery comes with the ``bench`` extra)::

    python -m benchmarks.throughput --json                          # SQLite, one JSON object on stdout
    python -m benchmarks.throughput --json --database postgresql    # a throw-away PostgreSQL database
    python -m benchmarks.throughput --operations 100 --rounds 1     # smaller; a table instead of JSON

Every variant runs the same work on the same number of worker processes and threads, one variant at a time
(its workers stopped before the next one starts), each under Redis keys of its own:

- ``plain_dramatiq``: ``dramatiq.pipeline`` of five no-op actors on a stock ``RedisBroker``, its workers
  polling every 10 ms at most (``dramatiq_worker_timeout=10``: with its default of a second they idle);
- ``executors``: an executor whose plan is five no-op steps in sequence (``noop.py``), its state in the
  database, its throttle scope's limit above the number of operations (present, never binding);
- ``celery``: a ``chain`` of five no-op tasks, Redis as the broker, no result backend.

No variant writes a log line per operation: Celery's workers run at ``--loglevel WARNING`` (its default; at INFO it
writes two lines per task), the executors' at ``JOBS_LOG_LEVEL=warning`` (at the dramatiq CLI's INFO they write one
per operation), and plain Dramatiq writes none at INFO. The last step of each operation adds one to a counter in
Redis. The variants take turns round by round (round 1: plain, executors, Celery; round 2: executors, Celery,
plain; ...), so that a slow spell of the machine falls on all of them rather than on the one running through it.
Each round of a variant starts its worker processes, warms them up with a batch, then enqueues ``--operations``
operations from this process and waits until the counter reaches that number (for the executors, also until the
database says every operation succeeded), and stops the workers. ops/s is operations over that time, enqueueing
included; a variant's figure is the median of its rounds.

With REDIS_URL set it uses that server; otherwise it starts a private embedded Redis. SQLite is a file in
a temporary directory; PostgreSQL is a database created for the run and dropped at its end. Every worker
process, key, row and file it made is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from rich.console import Console
from rich.table import Table

from jobs.processes import ManagedProcess, start_process, start_worker

from .cpu import read_cpu
from .entry import report
from .throttle import (
    BOOT_TIMEOUT_S,
    Environment,
    clean_up,
    create_tenant,
    operation_statuses,
    prepare_environment,
    summarize_log,
)

__all__ = [
    "Options",
    "Run",
    "VariantOutcome",
    "build_result",
    "celery_broker_url",
    "main",
    "parse_options",
    "ratio",
    "run",
]

VARIANTS = ("plain_dramatiq", "executors", "celery")
CELERY_POOLS = ("threads", "prefork")
DATABASES = ("sqlite", "postgresql")
#: Where ``--database postgresql`` creates its throw-away database (any database of the server will do to
#: connect from; the benchmark never touches its tables).
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Steps of every operation, in all three variants.
STEPS = 5
#: Where a round's CPU went (``benchmarks.cpu``): this process (enqueueing, and a cheap wait for the end), the
#: variant's worker processes, the Redis server, and the rest of the machine (the database server, others).
CPU_PARTS = ("this_process", "workers", "redis", "rest")
# What the worker modules (noop*.py) read from the environment, and their queues: set before they are imported.
PLAIN_NAMESPACE_ENV = "BENCH_PLAIN_NAMESPACE"
PLAIN_QUEUE = "default"
#: Stock Dramatiq's consumer polls with a sleep of up to its worker timeout, and sleeps so whenever its
#: prefetch is full: its default of a second would idle its threads. 10 ms is its best setting here; the
#: project's consumer waits for a wake-up instead and runs on the default.
PLAIN_WORKER_TIMEOUT_MS = 10
CELERY_BROKER_ENV = "BENCH_CELERY_BROKER"
CELERY_PREFIX_ENV = "BENCH_CELERY_PREFIX"
CELERY_QUEUE = "bench"
#: Under the Celery prefix: each Celery worker process adds one once it consumes.
CELERY_READY_KEY = "ready"
PROFILE_ENV = "BENCH_PROFILE_DIR"
#: How often the counter is read while waiting: small next to a round of a few seconds.
POLL_S = 0.005
REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPORARY = "<temporary directory>"

console = Console(stderr=True)


# -- options and results (no workers, no servers: unit-tested) -----------------------------------------------


@dataclass(frozen=True)
class Options:
    operations: int = 300
    processes: int = 2
    threads: int = 4
    database: str = "sqlite"
    rounds: int = 3
    warm_up: int = 32
    timeout_s: float = 300.0
    variants: tuple[str, ...] = VARIANTS
    celery_pool: str = "threads"
    postgres_url: str = DEFAULT_POSTGRES_URL
    profile: bool = False
    json_output: bool = False
    log_dir: Path | None = None


@dataclass(frozen=True)
class Run:
    """One timed round: operations enqueued, seconds spent enqueueing, seconds until all had completed, and
    the CPU seconds the whole machine spent meanwhile (None where it cannot be read), and of that, each
    part's."""

    operations: int
    enqueue_s: float
    total_s: float
    cpu_s: float | None = None
    #: The CPU seconds of each part (``CpuReading.since``): this process, the workers, Redis, the rest.
    cpu_parts: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def ops_per_s(self) -> float:
        return self.operations / self.total_s if self.total_s > 0 else 0.0

    @property
    def cpu_ms_per_op(self) -> float | None:
        return None if self.cpu_s is None or not self.operations else self.cpu_s * 1000 / self.operations

    def part_ms_per_op(self, part: str) -> float | None:
        seconds = self.cpu_parts.get(part)
        return None if seconds is None or not self.operations else seconds * 1000 / self.operations


@dataclass
class VariantOutcome:
    workers: str = ""
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    worker_log: dict[str, Any] = field(default_factory=dict)

    def ops_per_s(self) -> float | None:
        """The median round, or None if the variant failed or did not run."""
        from benchmarks.metrics import percentile

        if self.error is not None or not self.runs:
            return None
        value = percentile([run.ops_per_s for run in self.runs], 0.5)
        return None if value is None else round(value, 1)

    def cpu_ms_per_op(self) -> float | None:
        """The median round's machine-wide CPU milliseconds per operation, or None."""
        return self._median_cost(lambda run: run.cpu_ms_per_op)

    def cpu_ms_per_op_by_part(self) -> dict[str, float | None]:
        """Of the CPU an operation costs, the median round's milliseconds in each part (see ``CPU_PARTS``)."""
        return {part: self._median_cost(lambda run, part=part: run.part_ms_per_op(part)) for part in CPU_PARTS}

    def _median_cost(self, cost_of: Callable[[Run], float | None]) -> float | None:
        from benchmarks.metrics import percentile

        costs = [cost for run in self.runs if (cost := cost_of(run)) is not None]
        if self.error is not None or not costs:
            return None
        value = percentile(costs, 0.5)
        return None if value is None else round(value, 2)

    def summary(self) -> dict[str, Any]:
        return {
            "ops_per_s": self.ops_per_s(),
            "runs_ops_per_s": [round(run.ops_per_s, 1) for run in self.runs],
            "cpu_ms_per_op": self.cpu_ms_per_op(),
            "cpu_ms_per_op_by_part": self.cpu_ms_per_op_by_part(),
            "enqueue_s": [round(run.enqueue_s, 3) for run in self.runs],
            "total_s": [round(run.total_s, 3) for run in self.runs],
            "workers": self.workers,
            "worker_log": self.worker_log,
            "error": self.error,
        }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def build_result(
    options: Options,
    outcomes: Mapping[str, VariantOutcome],
    *,
    database_url: str,
    machine: Mapping[str, Any],
    duration_s: float,
) -> dict[str, Any]:
    """The one JSON object the benchmark prints."""
    rates = {name: outcomes[name].ops_per_s() if name in outcomes else None for name in VARIANTS}
    return {
        "plain_dramatiq_ops_per_s": rates["plain_dramatiq"],
        "executors_ops_per_s": rates["executors"],
        "celery_ops_per_s": rates["celery"],
        "ratio_vs_dramatiq": ratio(rates["executors"], rates["plain_dramatiq"]),
        "ratio_vs_celery": ratio(rates["executors"], rates["celery"]),
        # Where a ratio comes from: what one operation costs the whole machine in CPU, per variant, and where.
        "cpu_ms_per_op": {name: outcome.cpu_ms_per_op() for name, outcome in outcomes.items()},
        "cpu_ms_per_op_by_part": {name: outcome.cpu_ms_per_op_by_part() for name, outcome in outcomes.items()},
        "database": options.database,
        "database_url": database_url,
        "operations": options.operations,
        "processes": options.processes,
        "threads": options.threads,
        "steps": STEPS,
        "rounds": options.rounds,
        "warm_up_operations": options.warm_up,
        "celery_pool": options.celery_pool,
        "machine": dict(machine),
        "variants": {name: outcome.summary() for name, outcome in outcomes.items()},
        "duration_s": round(duration_s, 1),
    }


def shown_database_url(url: str, directory: Path | None = None) -> str:
    """The URL without its password, nor the temporary directory a SQLite file sits in."""
    from resources.urls import redact_url

    shown = redact_url(url)
    return shown.replace(str(directory), TEMPORARY) if directory is not None else shown


def celery_broker_url(redis_url: str) -> str:
    """kombu's spelling of a Redis URL: a unix socket is ``redis+socket://`` with the database number in
    ``virtual_host`` (redis-py's ``unix://…?db=N`` is not understood)."""
    parts = urlsplit(redis_url)
    if parts.scheme != "unix":
        return redis_url
    query = [("virtual_host" if name == "db" else name, value) for name, value in parse_qsl(parts.query)]
    return f"redis+socket://{parts.path}" + (f"?{urlencode(query)}" if query else "")


def machine_info(redis_kind: str) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other work on the machine skews every figure: worth a look before comparing runs.
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "redis": redis_kind,
    }


def short_location(filename: str) -> str:
    """A profiled function's file, relative to the repository or to site-packages (never a machine path)."""
    path = Path(filename)
    if "site-packages" in path.parts:
        return "/".join(path.parts[path.parts.index("site-packages") + 1 :])
    if path.is_relative_to(REPO_ROOT):
        return str(path.relative_to(REPO_ROOT))
    return filename if filename.startswith(("<", "~")) else path.name


def profile_summary(stats: pstats.Stats, *, count: int, unit: str, top: int = 15) -> dict[str, Any]:
    """Where the profiled threads spent their time: the top functions by cumulative and by own time, in ms
    per ``unit`` (``count`` of them ran). A thread's time includes its waits for the GIL, locks and I/O;
    "busy" is the worker threads' time in ``process_message``."""
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    busy = sum(
        cumulative
        for (filename, _line, function), (_cc, _calls, _own, cumulative, _callers) in entries.items()
        if function == "process_message" and filename.endswith("worker.py")
    )

    def row(key: tuple[str, int, str], value: tuple[int, int, float, float, Any]) -> dict[str, Any]:
        filename, line, function = key
        _cc, calls, own, cumulative, _callers = value
        return {
            "function": f"{short_location(filename)}:{line}({function})",
            "calls": calls,
            "cumulative_ms_each": round(cumulative * 1000 / max(count, 1), 3),
            "own_ms_each": round(own * 1000 / max(count, 1), 3),
            "share_of_busy": round(cumulative / busy, 3) if busy else None,
        }

    ordered = sorted(entries.items(), key=lambda item: item[1][3], reverse=True)
    project = [item for item in ordered if _is_project(item[0][0])]
    by_own = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)
    return {
        "unit": unit,
        "count": count,
        "busy_ms_each": round(busy * 1000 / max(count, 1), 3),
        "project_by_cumulative": [row(*item) for item in project[:top]],
        "all_by_cumulative": [row(*item) for item in ordered[:top]],
        "all_by_own_time": [row(*item) for item in by_own[:top]],
    }


def _is_project(filename: str) -> bool:
    path = Path(filename)
    return path.is_relative_to(REPO_ROOT) and "site-packages" not in path.parts


# -- the variants --------------------------------------------------------------------------------------------


class Variant:
    """One way of running the operation: its worker processes, and how an operation is sent."""

    name = ""

    def __init__(self, environment: Environment, options: Options) -> None:
        self.environment = environment
        self.options = options
        #: The worker processes of the round under way (each round starts its own).
        self.workers: list[ManagedProcess] = []
        #: The round under way, from 1: its workers log to files of their own.
        self.round = 0
        #: The brokers in the heartbeats set before this round's workers started (see ``wait_for_heartbeats``).
        self.heartbeats_before: set[str] = set()

    def log_path(self, suffix: str = "") -> Path:
        return self.environment.logs / f"{self.name}-round-{self.round}{suffix}.log"

    def log_paths(self) -> list[Path]:
        """The worker logs of every round so far."""
        return sorted(self.environment.logs.glob(f"{self.name}-round-*.log"))

    def start_round(self, stack: ExitStack, index: int) -> None:
        """Start round ``index``'s worker processes (``stack`` stops them) and wait until they consume."""
        from resources.redis_client import get_redis

        self.round, self.workers = index, []
        key = self.heartbeats_key()
        self.heartbeats_before = set(get_redis().zrange(key, 0, -1)) if key else set()
        self.start(stack)
        self.wait_ready(time.monotonic() + BOOT_TIMEOUT_S)

    def heartbeats_key(self) -> str | None:
        """Where Dramatiq's workers of this variant stamp their polls (None: not a Dramatiq variant)."""
        return None

    def describe(self) -> str:
        raise NotImplementedError

    def start(self, stack: ExitStack) -> None:
        """Start the worker processes; ``stack`` stops them."""
        raise NotImplementedError

    def wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def counter_key(self, label: str) -> str:
        raise NotImplementedError

    def prepare(self, count: int) -> Any:
        """What enqueueing ``count`` operations needs made first, untimed (e.g. database rows)."""
        return count

    def enqueue(self, prepared: Any, counter: str) -> Any:
        raise NotImplementedError

    def finished(self, sent: Any) -> bool:
        """Beyond the counter: whether every operation has completed (for the executors, in the database)."""
        return True

    def _keep(self, stack: ExitStack, worker: ManagedProcess) -> None:
        self.workers.append(worker)
        stack.callback(worker.stop)


class PlainDramatiq(Variant):
    name = "plain_dramatiq"

    @property
    def namespace(self) -> str:
        return f"{self.environment.namespace}-plain"

    def describe(self) -> str:
        return (
            f"dramatiq benchmarks.noop_plain:broker --processes {self.options.processes} "
            f"--threads {self.options.threads}"
        )

    def start(self, stack: ExitStack) -> None:
        os.environ[PLAIN_NAMESPACE_ENV] = self.namespace  # for this process's import of benchmarks.noop_plain
        worker = start_worker(
            self.name,
            queues=[PLAIN_QUEUE],
            processes=self.options.processes,
            threads=self.options.threads,
            module="benchmarks.noop_plain:broker",
            env={PLAIN_NAMESPACE_ENV: self.namespace, "dramatiq_worker_timeout": str(PLAIN_WORKER_TIMEOUT_MS)},
            log_path=self.log_path(),
        )
        self._keep(stack, worker)

    def heartbeats_key(self) -> str:
        return f"{self.namespace}:__heartbeats__"

    def wait_ready(self, deadline: float) -> None:
        from benchmarks.noop_plain import broker

        wait_for_heartbeats(self, self.heartbeats_key(), exclude={broker.broker_id}, deadline=deadline)

    def counter_key(self, label: str) -> str:
        return f"{self.namespace}:done:{label}"

    def enqueue(self, prepared: int, counter: str) -> None:
        self.send_pipelines(prepared, counter)

    @staticmethod
    def send_pipelines(count: int, counter: str) -> None:
        """``count`` pipelines of ``STEPS`` no-op steps, the last one adding one to ``counter``."""
        from dramatiq import pipeline

        from benchmarks.noop_plain import broker, plain_step

        for _ in range(count):
            # pipe_ignore: each step is called without its predecessor's result, as a chain of .si() is.
            messages = [plain_step.message_with_options(pipe_ignore=True) for _ in range(STEPS - 1)]
            messages.append(plain_step.message_with_options(args=(counter,), pipe_ignore=True))
            pipeline(messages, broker=broker).run()


#: The executors' worker processes log from WARNING, as Celery's do (see the module's docstring).
EXECUTORS_WORKER_ENV = {"JOBS_LOG_LEVEL": "warning"}


class Executors(Variant):
    name = "executors"

    def __init__(self, environment: Environment, options: Options) -> None:
        super().__init__(environment, options)
        self.batches = 0
        self.profiler: cProfile.Profile | None = cProfile.Profile() if options.profile else None

    @property
    def profile_directory(self) -> Path:
        return self.environment.directory / "profile"

    def describe(self) -> str:
        return (
            f"dramatiq jobs.app benchmarks.noop --processes {self.options.processes} --threads {self.options.threads}"
        )

    def start(self, stack: ExitStack) -> None:
        import benchmarks.noop  # noqa: F401 - the project's broker in this process too, as a service has it
        from jobs import queues

        env = dict(EXECUTORS_WORKER_ENV)
        if self.options.profile:
            env[PROFILE_ENV] = str(self.profile_directory)
        worker = start_worker(
            self.name,
            queues=[queues.DEFAULT],
            processes=self.options.processes,
            threads=self.options.threads,
            extra_modules=["benchmarks.noop"],
            env=env,
            log_path=self.log_path(),
        )
        self._keep(stack, worker)

    def heartbeats_key(self) -> str:
        return f"{self.environment.namespace}:dramatiq:__heartbeats__"

    def wait_ready(self, deadline: float) -> None:
        from jobs.broker import broker

        wait_for_heartbeats(self, self.heartbeats_key(), exclude={broker.broker_id}, deadline=deadline)

    def counter_key(self, label: str) -> str:
        return f"{self.environment.namespace}:bench:done:{label}"

    def prepare(self, count: int) -> list[int]:
        # One instance per operation in one tenant whose limit is above the number of operations: every
        # operation is admitted at once, so the throttle does its bookkeeping but never makes one wait.
        self.batches += 1
        tenant = create_tenant(self.environment, f"batch-{self.batches}", limit=count + 1, instances=count)
        return tenant.instance_ids

    def enqueue(self, prepared: list[int], counter: str) -> list[str]:
        if self.profiler is not None:
            self.profiler.enable()
        try:
            return self._enqueue(prepared, counter)
        finally:
            if self.profiler is not None:
                self.profiler.disable()

    @staticmethod
    def _enqueue(instance_ids: list[int], counter: str, executor: Any = None) -> list[str]:
        from benchmarks.noop import NoopExecutor
        from resources.db import session_scope
        from resources.models import Instance

        executor = executor or NoopExecutor
        operation_ids = []
        for instance_id in instance_ids:
            # A transaction per operation, as a service starting one operation per request does; the
            # first step is sent when it commits.
            with session_scope() as session:
                instance = session.get(Instance, instance_id)
                operation_ids.append(executor.execute(instance, counter=counter, steps=STEPS).id)
        return operation_ids

    def finished(self, sent: list[str]) -> bool:
        statuses = operation_statuses(sent)
        if statuses.get("running"):
            return False
        if set(statuses) != {"succeeded"} or sum(statuses.values()) != len(sent):
            raise RuntimeError(f"executor operations ended {dict(statuses)}, not all succeeded")
        return True


class CeleryChains(Variant):
    name = "celery"

    @property
    def prefix(self) -> str:
        return f"{self.environment.namespace}-celery:"

    def describe(self) -> str:
        if self.options.celery_pool == "prefork":
            return f"1 x celery worker --pool prefork --concurrency {self.options.processes * self.options.threads}"
        return f"{self.options.processes} x celery worker --pool threads --concurrency {self.options.threads}"

    def start(self, stack: ExitStack) -> None:
        env = {
            CELERY_BROKER_ENV: celery_broker_url(os.environ["REDIS_URL"]),
            CELERY_PREFIX_ENV: self.prefix,
        }
        os.environ.update(env)  # for this process's import of benchmarks.noop_celery
        from resources.redis_client import get_redis

        get_redis().delete(self.prefix + CELERY_READY_KEY)  # counted again by this round's workers
        # Default: as many Celery worker processes as Dramatiq's, each with a pool of as many threads, so
        # both run P processes x T threads sharing a GIL per process (no-op tasks are all Python, so the
        # GIL, not I/O, is what the thread count decides). --celery-pool prefork instead runs one worker
        # with P x T forked children: the same concurrency, Celery's default pool, more processes.
        if self.options.celery_pool == "prefork":
            layouts = [("prefork", self.options.processes * self.options.threads)]
        else:
            layouts = [("threads", self.options.threads)] * self.options.processes
        for index, (pool, concurrency) in enumerate(layouts):
            command = [
                sys.executable,
                "-m",
                "celery",
                "--app",
                "benchmarks.noop_celery",
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "--queues",
                CELERY_QUEUE,
                "--hostname",
                f"bench{index}@%h",
                # Nothing but consuming: no cluster chatter the Dramatiq workers do not have either.
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ]
            log_path = self.log_path(f"-{index + 1}")
            name = f"{self.name}-{index + 1}-round-{self.round}"
            self._keep(stack, start_process(name, command, env=env, log_path=log_path))

    def wait_ready(self, deadline: float) -> None:
        from resources.redis_client import get_redis

        key = self.prefix + CELERY_READY_KEY
        wait_until(
            lambda: int(get_redis().get(key) or 0) >= len(self.workers),
            variant=self,
            deadline=deadline,
            what=f"{len(self.workers)} Celery worker(s) to be ready",
        )

    def counter_key(self, label: str) -> str:
        return f"{self.prefix}done:{label}"

    def enqueue(self, prepared: int, counter: str) -> None:
        from celery import chain

        from benchmarks.noop_celery import step

        for _ in range(prepared):
            chain(*(step.si() for _ in range(STEPS - 1)), step.si(counter)).apply_async()


VARIANT_CLASSES: dict[str, type[Variant]] = {
    "plain_dramatiq": PlainDramatiq,
    "executors": Executors,
    "celery": CeleryChains,
}


# -- waiting and measuring -----------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], *, variant: Variant, deadline: float, what: str) -> None:
    """Poll ``condition``; fail at once if a worker process of ``variant`` exits, or at ``deadline``."""
    while not condition():
        dead = [worker.name for worker in variant.workers if not worker.alive()]
        if dead:
            raise RuntimeError(f"worker process {', '.join(dead)} exited while waiting for {what}; see --log-dir")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{variant.name}: no {what} in time; see --log-dir for the worker logs")
        time.sleep(POLL_S)


def wait_for_heartbeats(variant: Variant, key: str, *, exclude: set[str], deadline: float) -> None:
    """Until every worker process polls: Dramatiq's Redis broker stamps each broker's polls in a heartbeats
    set (this process's own broker too, once it has sent something). The set keeps the stopped workers of earlier
    rounds for a while: only brokers not in it when the round's workers started count."""
    from resources.redis_client import get_redis

    wanted = variant.options.processes
    ignored = exclude | variant.heartbeats_before
    wait_until(
        lambda: len(set(get_redis().zrange(key, 0, -1)) - ignored) >= wanted,
        variant=variant,
        deadline=deadline,
        what=f"{wanted} worker processes polling",
    )


def measure(variant: Variant, count: int, label: str, timeout_s: float) -> Run:
    """Enqueue ``count`` operations and wait until all have completed."""
    from resources.redis_client import get_redis

    client = get_redis()
    counter = variant.counter_key(label)
    prepared = variant.prepare(count)
    groups = [worker.process.pid for worker in variant.workers]  # each worker command leads its process group
    cpu_before = read_cpu(groups, client)
    started = time.perf_counter()
    sent = variant.enqueue(prepared, counter)
    enqueued = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    what = f"{count} operations of {label} completing within {timeout_s:.0f} s"
    wait_until(lambda: int(client.get(counter) or 0) >= count, variant=variant, deadline=deadline, what=what)
    wait_until(lambda: variant.finished(sent), variant=variant, deadline=deadline, what=what)
    total_s = time.perf_counter() - started
    spent = read_cpu(groups, client).since(cpu_before)
    return Run(count, enqueued - started, total_s, spent["machine"], spent)


def round_order(variants: Sequence[str], index: int) -> list[str]:
    """The order in which round ``index`` (from 0) runs ``variants``: one further along each round, so that no
    variant always runs first (after the machine sat idle) or last."""
    if not variants:
        return []
    offset = index % len(variants)
    return [*variants[offset:], *variants[:offset]]


def run_round(variant: Variant, options: Options, index: int) -> Run:
    """Round ``index`` (from 1) of ``variant``: start its workers, warm them up, time the round, stop them."""
    with ExitStack() as stack:
        booting = time.monotonic()
        variant.start_round(stack, index)
        measure(variant, options.warm_up, f"warm-up-{index}", options.timeout_s)
        console.print(f"{variant.name}: round {index}: workers ready and warm in {time.monotonic() - booting:.1f} s")
        return measure(variant, options.operations, f"round-{index}", options.timeout_s)


def run_variants(environment: Environment, options: Options) -> tuple[dict[str, VariantOutcome], dict[str, Any]]:
    """Every round of every variant, the rounds taking turns (``round_order``): a slow spell of the machine, whose
    CPUs other tenants share, then falls on each variant alike instead of on whichever ran through it. Returns each
    variant's outcome and, when profiling the executors, the profile summary."""
    variants = {name: VARIANT_CLASSES[name](environment, options) for name in options.variants}
    outcomes = {name: VariantOutcome(workers=variant.describe()) for name, variant in variants.items()}
    for index in range(options.rounds):
        for name in round_order(options.variants, index):
            outcome = outcomes[name]
            if outcome.error is not None:
                continue
            try:
                run_ = run_round(variants[name], options, index + 1)
            except Exception as error:  # one broken variant still leaves the others' figures
                outcome.error = f"{type(error).__name__}: {error}"
                console.print(f"[red]{name}: {outcome.error}[/]")
                continue
            outcome.runs.append(run_)
            console.print(
                f"{name}: round {index + 1}: {run_.ops_per_s:.1f} operations/s "
                f"({run_.total_s:.2f} s, enqueueing {run_.enqueue_s:.2f} s)"
            )
    for name, variant in variants.items():
        outcomes[name].worker_log = worker_log_counts(variant)
    executors = variants.get("executors")
    profile = profile_of(executors) if isinstance(executors, Executors) and options.profile else {}
    return outcomes, profile


def worker_log_counts(variant: Variant) -> dict[str, Any]:
    """Warnings, errors and exception types in the variant's worker logs (not their text: it may name
    paths of this machine)."""
    total: dict[str, Any] = {"warnings": 0, "errors": 0, "exceptions": {}}
    for log_path in variant.log_paths():
        report = summarize_log(log_path)
        total["warnings"] += report["warnings"]
        total["errors"] += report["errors"]
        for exception, count in report["exceptions"].items():
            total["exceptions"][exception] = total["exceptions"].get(exception, 0) + count
    return total


def profile_of(variant: Executors) -> dict[str, Any]:
    """The worker threads' profiles (written when the workers stopped) and this process's enqueueing."""
    options = variant.options
    operations = options.rounds * (options.warm_up + options.operations)  # the warm-ups are profiled too
    result: dict[str, Any] = {}
    workers = sorted(str(path) for path in variant.profile_directory.glob("*-worker-*.prof"))
    consumers = sorted(str(path) for path in variant.profile_directory.glob("*-consumer-*.prof"))
    if workers:
        result["worker_threads"] = profile_summary(pstats.Stats(*workers), count=operations * STEPS, unit="step")
    if consumers:
        result["consumer_threads"] = profile_summary(
            pstats.Stats(*consumers), count=operations * STEPS, unit="step", top=10
        )
    if variant.profiler is not None:
        result["enqueue"] = profile_summary(pstats.Stats(variant.profiler), count=operations, unit="operation")
    return result


# -- the run -------------------------------------------------------------------------------------------------


@contextmanager
def throwaway_postgres(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database ``bench_<hex>`` on the server of ``admin_url``, dropped at the end
    (with any connection a killed worker left)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from resources.config import normalise_database_url

    admin = make_url(normalise_database_url(admin_url))
    name = f"bench_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def delete_keys(prefix: str) -> None:
    from resources.redis_client import get_redis

    client = get_redis()
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def run(options: Options) -> dict[str, Any]:
    started = time.monotonic()
    with ExitStack() as stack:
        environment = prepare_environment(stack)  # restores the environment variables when the stack closes
        environment.database = options.database
        if options.database == "postgresql":
            os.environ["DATABASE_URL"] = stack.enter_context(throwaway_postgres(options.postgres_url))
        else:
            # Our own file even when DATABASE_URL names another database: --database decides.
            os.environ["DATABASE_URL"] = f"sqlite:///{environment.directory / 'bench.sqlite3'}"
        database_url = shown_database_url(os.environ["DATABASE_URL"], environment.directory)
        # Imported only now: the project's modules read REDIS_URL and the namespace when they are imported.
        from resources.db import create_schema

        stack.callback(_keep_logs, environment, options.log_dir)
        create_schema()
        stack.callback(clean_up, environment)  # the executors' keys and rows; the engine, before any DROP
        stack.callback(delete_keys, f"{environment.namespace}-plain:")
        stack.callback(delete_keys, f"{environment.namespace}-celery:")
        machine = machine_info(environment.redis)
        outcomes, profile = run_variants(environment, options)
        machine["load_average_at_end"] = round(os.getloadavg()[0], 2)
    result = build_result(
        options, outcomes, database_url=database_url, machine=machine, duration_s=time.monotonic() - started
    )
    if profile:
        result["executors_profile"] = profile
    return result


def _keep_logs(environment: Environment, log_dir: Path | None) -> None:
    import shutil

    if log_dir is None:
        return
    for kept in ("logs", "profile"):  # the worker logs, and the raw profiles of --profile for pstats
        if (environment.directory / kept).exists():
            shutil.copytree(environment.directory / kept, log_dir / kept, dirs_exist_ok=True)


# -- output and command line ---------------------------------------------------------------------------------


def render(result: dict[str, Any], out: Console) -> None:
    table = Table(
        title=(
            f"{result['operations']} operations of {result['steps']} no-op steps, {result['processes']} processes x "
            f"{result['threads']} threads, {result['database']}"
        ),
        title_justify="left",
    )
    columns = ("variant", "ops/s (median)", "rounds ops/s", "CPU ms/op", "of it: this process / workers / Redis / rest")
    for column in (*columns, "workers", "error"):
        table.add_column(column)
    for name, figures in result["variants"].items():
        by_part = figures.get("cpu_ms_per_op_by_part", {})
        table.add_row(
            name,
            str(figures["ops_per_s"]),
            ", ".join(map(str, figures["runs_ops_per_s"])),
            str(figures["cpu_ms_per_op"]),
            " / ".join(str(by_part.get(part)) for part in CPU_PARTS),
            figures["workers"],
            figures["error"] or "",
        )
    out.print(table)
    out.print(
        f"executors / plain Dramatiq: {result['ratio_vs_dramatiq']}; executors / Celery: {result['ratio_vs_celery']}; "
        f"run took {result['duration_s']} s"
    )


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--operations", type=int, default=300, help="operations per timed round (default 300)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes per variant (default 2)")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process (default 4)")
    parser.add_argument("--database", choices=DATABASES, default="sqlite", help="the executors' database")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant; the median counts")
    parser.add_argument("--warm-up", type=int, help="operations of the untimed warm-up (default 4 per thread)")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for one round, seconds")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which to run")
    parser.add_argument(
        "--celery-pool", choices=CELERY_POOLS, default="threads", help="Celery's pool (see CeleryChains.start)"
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL server to create the throw-away database on (default: BENCH_POSTGRES_URL, or local)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the executors' worker threads and enqueueing (slower)"
    )
    parser.add_argument("--log-dir", type=Path, help="keep the worker logs (and raw profiles) in this directory")
    args = parser.parse_args(argv)
    for flag in ("operations", "processes", "threads", "rounds", "warm_up"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return Options(
        operations=args.operations,
        processes=args.processes,
        threads=args.threads,
        database=args.database,
        rounds=args.rounds,
        warm_up=args.warm_up or 4 * args.processes * args.threads,
        timeout_s=args.timeout,
        variants=tuple(dict.fromkeys(args.variants)),
        celery_pool=args.celery_pool,
        postgres_url=args.postgres_url,
        profile=args.profile,
        json_output=args.json,
        log_dir=args.log_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    return report(lambda: run(options), json_output=options.json_output, render=render, exit_status=_failed)


def _failed(result: dict[str, Any]) -> int:
    return 1 if any(figures["error"] for figures in result["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
