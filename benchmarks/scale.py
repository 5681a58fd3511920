"""How the throttle scales with a backlog: the cost per operation and Redis memory per parked operation with
1,000, 10,000 and 100,000 operations queued over 1,000 scopes.

Run from the repository root::

    python -m benchmarks.scale --json                    # one JSON object on stdout (progress on stderr)
    python -m benchmarks.scale --levels 1000,10000       # other backlog sizes; a table instead of JSON
    python -m benchmarks.scale --database postgresql     # the executor path on a throw-away PostgreSQL database

Every scope has a limit of 1 (``--limit``): one operation holds each scope, and every operation submitted
after that waits. Two paths build the backlog:

- ``throttle_store_path`` (every level): ``Throttle.submit`` parks operations whose first-step messages are
  what ``execute()`` of a small executor (``noop.py``) sends, with fresh ids per operation. There is no
  database. Each level gets a fresh embedded Redis of its own, so its ``INFO memory`` figure only covers its
  own backlog. A hand-off is ``ThrottleStore.release`` plus ``Throttle.send`` of the next waiter's first
  step to a Dramatiq ``RedisBroker`` on the same server. This is the body of ``Throttle.release``, split so
  that every hand-off can be checked to go to the head of the line.
- ``executor_path`` (the levels that fit ``--budget``): ``NoopExecutor.execute()`` with its row in the
  database (its first steps marked not yet sent) and its throttle binding, one committed transaction per
  operation, as an API request makes. A hand-off is ``OperationHandle.cancel()`` of a holder: its row, its
  outbox row (the failure callbacks and the release), the release and the send. Every submit and every
  hand-off commits to the database, so this path is bound by it (milliseconds, not microseconds); it shows
  whether the full producer path stays flat. It runs after the store path, on
  an embedded Redis of its own, one level at a time on fresh tenants, with ``--executor-sample`` pairs. A
  level whose projected time (from the cost of its holders' executes) would overrun the budget is skipped.

For each backlog size N:

1. **Build**: the holders, then N parked operations, each submission timed. ``INFO memory`` ``used_memory``
   is read before and after the N parks, and the difference divided by N; next to it, what the parked
   operations' own keys take (``MEMORY USAGE``), which explains the figure.
2. **Steady state**: ``--sample`` pairs, each a timed release with its hand-off followed by a timed park
   of a replacement on the same scope, so the backlog stays at N throughout. The store path's levels take
   turns in ``--rounds`` rounds, so a change in the machine's load affects every level alike.

``flat_ratio`` is the p50 at the largest backlog over the p50 at the smallest. Near 1 means the cost per
operation does not grow with the backlog.

Everything it starts (Redis servers), the rows, keys and files it creates, and a PostgreSQL database,
are removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain, islice, pairwise
from typing import Any

from rich.console import Console
from rich.table import Table

from .entry import report
from .metrics import percentile
from .throughput import DATABASES, DEFAULT_POSTGRES_URL, machine_info, shown_database_url, throwaway_postgres

__all__ = [
    "LevelRun",
    "Options",
    "build_result",
    "fits_budget",
    "flat_ratios",
    "level_summary",
    "main",
    "means_by_tenth",
    "parse_levels",
    "parse_options",
    "run",
    "summarize_us",
]

DEFAULT_LEVELS = (1_000, 10_000, 100_000)
#: Steps of the benchmark executor's operations; only the first is parked, the rest follow it.
STEPS = 3
LIMIT_OPTION = "max_concurrent_provision_instance"
#: The projected executor-path time is padded by this much before it is held against the budget: the
#: machine's load changes while the level runs.
PROJECTION_MARGIN = 1.2
#: Redis frees a connection's query buffer once it has been idle for 2 s: wait that out before the first
#: memory reading, so the buffers of connections that go quiet during the build are not counted as freed.
SETTLE_S = 3.0

console = Console(stderr=True)


# -- options and figures (no servers: unit-tested) ------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    levels: tuple[int, ...] = DEFAULT_LEVELS
    scopes: int = 1_000
    limit: int = 1
    #: Timed pairs (release with hand-off, park) per level, and how many of the build's last parks are reported.
    sample: int = 1_000
    rounds: int = 10
    #: None: the same as ``levels``, as far as the budget allows.
    executor_levels: tuple[int, ...] | None = None
    executor_sample: int = 500
    #: Seconds for the whole run; executor-path levels that would not fit are skipped. 0: no limit.
    budget_s: float = 540.0
    database: str = "sqlite"
    postgres_url: str = DEFAULT_POSTGRES_URL
    json_output: bool = False
    #: Seconds to wait before the first memory reading of each level (see ``SETTLE_S``).
    settle_s: float = SETTLE_S

    @property
    def executor_backlogs(self) -> tuple[int, ...]:
        return self.levels if self.executor_levels is None else self.executor_levels


@dataclass
class LevelRun:
    """One backlog size on one path: every timing in seconds, in the order it was taken."""

    backlog: int
    holders: int
    scopes: int
    build_s: float = 0.0
    build_submits: list[float] = field(default_factory=list)
    steady_submits: list[float] = field(default_factory=list)
    steady_handoffs: list[float] = field(default_factory=list)
    #: INFO memory used_memory before and after the parks.
    memory_before: int = 0
    memory_after: int = 0
    #: What parked operations' own keys take (MEMORY USAGE), and one message body.
    footprint: dict[str, float] = field(default_factory=dict)
    backlog_intact: bool = False
    #: Hand-offs that went to someone other than the head of the scope's line, or to nobody.
    handoff_errors: int = 0


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1000,10_000"`` -> (1000, 10000): positive, without repeats, smallest first."""
    try:
        levels = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one backlog size, each at least 1")
    return tuple(sorted(levels))


def summarize_us(samples_s: Sequence[float]) -> dict[str, Any]:
    """Count, mean, p50, p99 and max of samples in seconds, in µs rounded to 0.1 (None when empty)."""

    def us(value: float | None) -> float | None:
        return None if value is None else round(value * 1e6, 1)

    return {
        "n": len(samples_s),
        "mean": us(sum(samples_s) / len(samples_s) if samples_s else None),
        "p50": us(percentile(samples_s, 0.50)),
        "p99": us(percentile(samples_s, 0.99)),
        "max": us(max(samples_s) if samples_s else None),
    }


def means_by_tenth(samples_s: Sequence[float]) -> list[float]:
    """The mean of each tenth of the samples in µs, oldest first: does the cost grow as the backlog fills?"""
    parts = min(10, len(samples_s))
    if not parts:
        return []
    bounds = [round(i * len(samples_s) / parts) for i in range(parts + 1)]
    return [
        round(sum(samples_s[start:stop]) / (stop - start) * 1e6, 1) for start, stop in pairwise(bounds) if stop > start
    ]


def level_summary(run_: LevelRun, sample: int) -> dict[str, Any]:
    """The JSON figures of one level. ``sample``: how many of the build's last parks make ``build_last``."""
    grown = run_.memory_after - run_.memory_before
    return {
        "backlog": run_.backlog,
        "holders": run_.holders,
        "scopes_with_waiters": min(run_.backlog, run_.scopes),
        "waiters_per_scope": round(run_.backlog / run_.scopes, 2),
        "build_s": round(run_.build_s, 1),
        "submit_us": {
            "steady": summarize_us(run_.steady_submits),
            "build_last": summarize_us(run_.build_submits[-sample:]),
            "build_mean_by_tenth": means_by_tenth(run_.build_submits),
        },
        "handoff_us": summarize_us(run_.steady_handoffs),
        "redis_memory": {
            "used_memory_before_bytes": run_.memory_before,
            "used_memory_after_bytes": run_.memory_after,
            # Client buffers move used_memory by some tens of KB: below a few thousand parked operations,
            # the keys' own figure is the steadier one.
            "per_parked_op_bytes": round(grown / run_.backlog, 1) if run_.backlog else None,
            "keys_per_parked_op_bytes": dict(run_.footprint),
        },
        "checks": {"backlog_intact": run_.backlog_intact, "handoffs_to_head_of_line": run_.handoff_errors == 0},
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def flat_ratios(levels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Largest backlog over smallest among the levels that ran: steady-state submit and hand-off p50 (and
    the build's last submissions, and the memory per parked operation). None with fewer than two levels."""
    ran = sorted((level for level in levels if "skipped" not in level), key=lambda level: level["backlog"])
    if len(ran) < 2:
        return {"basis": "fewer than two levels ran", "submit": None, "handoff": None}
    small, large = ran[0], ran[-1]
    return {
        "basis": f"p50 at backlog {large['backlog']} / p50 at backlog {small['backlog']}",
        "submit": _ratio(large["submit_us"]["steady"]["p50"], small["submit_us"]["steady"]["p50"]),
        "handoff": _ratio(large["handoff_us"]["p50"], small["handoff_us"]["p50"]),
        "submit_build_last": _ratio(large["submit_us"]["build_last"]["p50"], small["submit_us"]["build_last"]["p50"]),
        "memory_per_parked_op": _ratio(
            large["redis_memory"]["per_parked_op_bytes"], small["redis_memory"]["per_parked_op_bytes"]
        ),
    }


def fits_budget(operations: int, seconds_each: float, *, elapsed_s: float, budget_s: float) -> tuple[bool, float]:
    """Whether ``operations`` more at ``seconds_each`` (with a margin) end within the budget; and the projection."""
    projected = operations * seconds_each * PROJECTION_MARGIN
    return (budget_s <= 0 or elapsed_s + projected <= budget_s), projected


def build_result(
    options: Options,
    store_levels: Sequence[dict[str, Any]],
    executor_levels: Sequence[dict[str, Any]],
    *,
    message_body_bytes: int | None,
    machine: dict[str, Any],
    database_url: str | None,
    duration_s: float,
) -> dict[str, Any]:
    """The one JSON object the benchmark prints."""
    return {
        "benchmark": "scale",
        "levels": list(options.levels),
        "scopes": options.scopes,
        "limit_per_scope": options.limit,
        "sample": options.sample,
        "rounds": options.rounds,
        "units": "submit_us and handoff_us in microseconds per operation; memory in bytes",
        "parked_message_body_bytes": message_body_bytes,
        "throttle_store_path": {
            "what": (
                "Throttle.submit of an operation's first steps (parks it); hand-off = ThrottleStore.release "
                "+ Throttle.send of the next waiter's first step to a RedisBroker; no database; each level on "
                "a fresh embedded Redis of its own; steady-state samples interleaved across levels"
            ),
            "levels": list(store_levels),
            "flat_ratio": flat_ratios(store_levels),
        },
        "executor_path": {
            "what": (
                "NoopExecutor.execute() of a detached instance (own transaction: the operation's row, its first "
                "steps marked; Throttle.submit after commit); hand-off = OperationHandle.cancel() of a holder; "
                "levels one after the other on fresh tenants"
            ),
            "sample": options.executor_sample,
            "levels": list(executor_levels),
            "flat_ratio": flat_ratios(executor_levels),
        },
        "machine": machine,
        "database": options.database,
        "database_url": database_url,
        "budget_s": options.budget_s,
        "duration_s": round(duration_s, 1),
    }


# -- timing helpers --------------------------------------------------------------------------------------------


def timed(call: Callable[[], Any], into: list[float]) -> Any:
    started = time.perf_counter()
    result = call()
    into.append(time.perf_counter() - started)
    return result


def quiet_gc() -> None:
    """Collect now and freeze what survives: later collections skip the benchmark's own bookkeeping, which
    grows with the backlog and would otherwise make pauses grow with it too."""
    gc.collect()
    gc.freeze()


# -- the throttle store path -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScopeTemplate:
    """One scope's throttle binding and the first-step messages ``execute()`` builds for an operation in it."""

    scopes: list[Any]
    outgoing: list[Any]


def scope_templates(count: int, limit: int) -> list[ScopeTemplate]:
    """One template per scope, built by the executor itself (its plan, as ``execute()`` builds it) for a
    tenant and an instance that live only in memory."""
    from sqlalchemy.orm import Session

    from benchmarks.noop import NoopExecutor
    from jobs.executors.base import OperationBuilder
    from middleware.progress import first_steps
    from middleware.throttle import scopes_of
    from resources.models import Instance, ServiceSettings

    session = Session()  # the builder hands it to pre_apply, which does nothing here; never bound to a database
    templates = []
    for index in range(count):
        tenant = ServiceSettings(name=f"scale-{index}", uuid=uuid.uuid4().hex, options={LIMIT_OPTION: limit})
        instance = Instance(name=f"scale-{index}", uuid=uuid.uuid4().hex, service_settings=tenant)
        builder = OperationBuilder(uuid.uuid4().hex, session)
        plan = builder.finish(NoopExecutor._build(builder, instance, {"counter": "scale:done", "steps": STEPS}))
        templates.append(ScopeTemplate(scopes_of(plan), first_steps(plan)))
    return templates


def new_operation(template: ScopeTemplate) -> tuple[str, list[Any]]:
    """A new operation of the template's scope: the same messages with its own ids (so the same size)."""
    from middleware.plan import OPTION_OPERATION, OPTION_RESOURCE
    from middleware.progress import Outgoing

    operation_id = uuid.uuid4().hex
    options = {OPTION_OPERATION: operation_id, OPTION_RESOURCE: f"instance:{uuid.uuid4().hex}"}
    now_ms = int(time.time() * 1000)
    outgoing = [
        Outgoing(item.message.copy(options=options, message_id=str(uuid.uuid4()), message_timestamp=now_ms), item.delay)
        for item in template.outgoing
    ]
    return operation_id, outgoing


class StoreLevel:
    """One backlog size on a Redis server of its own: the throttle's store, a broker, and who holds and who
    waits in each scope (to know which operation each hand-off must go to)."""

    def __init__(self, stack: ExitStack, backlog: int, options: Options, templates: list[ScopeTemplate]) -> None:
        import redis
        from dramatiq.brokers.redis import RedisBroker

        from jobs.embedded_redis import EmbeddedRedis
        from middleware.throttle import Throttle, ThrottleStore
        from resources.config import get_settings

        url = stack.enter_context(EmbeddedRedis())
        settings = get_settings()
        self.client = redis.Redis.from_url(url, decode_responses=True)
        stack.callback(self.client.close)
        self.store = ThrottleStore(
            self.client,
            "scale:throttle",
            lease_ms=int(settings.throttle_lease_s * 1000),
            handoff_timeout_ms=int(settings.throttle_handoff_timeout_s * 1000),
        )
        self.throttle = Throttle(settings, store=self.store)
        self.throttle.enabled = True  # whatever JOBS_THROTTLE says: the throttle is what is measured
        self.broker = RedisBroker(url=url, namespace="scale:dramatiq", middleware=[])
        stack.callback(self.broker.close)
        self.templates = templates
        self.sample = options.sample
        self.settle_s = options.settle_s
        self.run = LevelRun(backlog, holders=options.scopes * options.limit, scopes=options.scopes)
        self.holders: list[deque[str]] = [deque() for _ in templates]
        self.waiters: list[deque[str]] = [deque() for _ in templates]
        self._next_scope = 0

    def submit(self, scope: int, into: list[float] | None = None) -> str:
        """A holder (``into`` None: must be granted) or a timed park (must be parked)."""
        operation_id, outgoing = new_operation(self.templates[scope])

        def call() -> str:
            return self.throttle.submit(self.broker, operation_id, self.templates[scope].scopes, outgoing)

        status = call() if into is None else timed(call, into)
        expected = "granted" if into is None else "parked"
        if status != expected:
            raise RuntimeError(f"an operation of scope {scope} was {status}, not {expected}")
        (self.holders if into is None else self.waiters)[scope].append(operation_id)
        return operation_id

    def build(self, limit: int) -> None:
        """The holders, then the backlog, each park timed; memory before and after the parks."""
        for scope in range(len(self.templates)):
            for _ in range(limit):
                self.submit(scope)
        quiet_gc()
        self.run.memory_before = used_memory(self.client, settle_s=self.settle_s)
        started = time.perf_counter()
        for index in range(self.run.backlog):
            self.submit(index % len(self.templates), self.run.build_submits)
        self.run.build_s = time.perf_counter() - started
        self.run.memory_after = used_memory(self.client)
        keys = [template.scopes[0].key for template in self.templates]
        self.run.footprint = parked_footprint(self.client, self.store.prefix, self.waiters, keys, self.sample)

    def pairs(self, count: int) -> None:
        """``count`` times: release a holder and hand its slot on (timed), then park a replacement (timed)."""
        active = min(self.run.backlog, len(self.templates))  # scopes that have someone waiting
        for _ in range(count):
            scope = self._next_scope % active
            self._next_scope += 1
            holder = self.holders[scope].popleft()
            timed(
                lambda holder=holder: self.throttle.send(self.broker, self.store.release(holder)),
                self.run.steady_handoffs,
            )
            # FIFO: the slot must have gone to the head of this scope's line.
            expected = self.waiters[scope].popleft()
            if self.store.state_of(expected) != "granted":
                self.run.handoff_errors += 1
            self.holders[scope].append(expected)
            self.submit(scope, self.run.steady_submits)

    def check(self, limit: int) -> None:
        occupancy = self.store.occupancy()
        keys = [template.scopes[0].key for template in self.templates]
        waiting = sum(occupancy[key][2] for key in keys)
        self.run.backlog_intact = waiting == self.run.backlog and all(occupancy[key][1] == limit for key in keys)


def used_memory(client: Any, *, settle_s: float = 0.0) -> int:
    """INFO memory ``used_memory``. ``settle_s``: wait first, so that Redis frees the buffers of connections
    that stay idle from now on (after 2 s idle) before the reading instead of during the measurement."""
    time.sleep(settle_s)
    return int(client.info("memory")["used_memory"])


def parked_footprint(
    client: Any, prefix: str, lines: Sequence[Sequence[str]], scope_keys: Sequence[str], sample: int
) -> dict[str, float]:
    """What parked operations keep in keys of their own (MEMORY USAGE, exact: SAMPLES 0): the mean of the
    message list and the operation hash over up to ``sample`` of them, each one's share of the scopes'
    waiter sets, and one message body. Key names as in the throttle's Lua."""
    operations = list(islice(chain.from_iterable(lines), sample))
    parked = sum(map(len, lines))
    if not operations:
        return {}
    pipe = client.pipeline(transaction=False)
    for operation in operations:
        pipe.memory_usage(f"{prefix}:msgs:{operation}", samples=0)
        pipe.memory_usage(f"{prefix}:op:{operation}", samples=0)
    for key in scope_keys:
        pipe.memory_usage(f"{prefix}:waiters:{key}", samples=0)
    pipe.lindex(f"{prefix}:msgs:{operations[0]}", 0)
    *usages, entry = pipe.execute()
    messages, hashes = usages[0 : 2 * len(operations) : 2], usages[1 : 2 * len(operations) : 2]
    waiter_sets = usages[2 * len(operations) :]
    figures = {
        "message_list": round(sum(int(u or 0) for u in messages) / len(operations), 1),
        "operation_hash": round(sum(int(u or 0) for u in hashes) / len(operations), 1),
        "waiters_entry": round(sum(int(u or 0) for u in waiter_sets) / parked, 1),
    }
    return {
        **figures,
        "total": round(sum(figures.values()), 1),
        "sampled_operations": len(operations),
        "message_body": len((entry or "").partition("|")[2].encode()),
    }


def run_store_path(options: Options) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Every level: builds, then the steady-state pairs in rounds across levels. Returns the level figures,
    the size of one parked message body and the Redis version."""
    with ExitStack() as stack:  # the servers stop as soon as their figures are taken
        templates = scope_templates(options.scopes, options.limit)
        levels = []
        for backlog in options.levels:
            level = StoreLevel(stack, backlog, options, templates)
            console.print(f"store path: building a backlog of {backlog} over {options.scopes} scopes")
            level.build(options.limit)
            console.print(f"store path: backlog {backlog} built in {level.run.build_s:.1f} s")
            levels.append(level)
        quiet_gc()
        per_round = math.ceil(options.sample / options.rounds)
        done = 0
        for round_ in range(options.rounds):
            count = min(per_round, options.sample - done)
            if count <= 0:
                break
            for offset in range(len(levels)):  # a different level goes first each round
                levels[(round_ + offset) % len(levels)].pairs(count)
            done += count
        console.print(f"store path: {done} release/park pairs per level in {options.rounds} rounds")
        for level in levels:
            level.check(options.limit)
        version = levels[0].client.info("server")["redis_version"] if levels else None
        message = levels[0].run.footprint.get("message_body") if levels else None
        summaries = [level_summary(level.run, options.sample) for level in levels]
    gc.unfreeze()
    return summaries, message, version


# -- the executor path -----------------------------------------------------------------------------------------


class ExecutorLevel:
    """One backlog size through ``execute()``: tenants (scopes) and one instance per operation in the
    database, every operation its own committed transaction."""

    def __init__(self, environment: Any, backlog: int, options: Options) -> None:
        import dramatiq

        from middleware.throttle import find_throttle

        throttle = find_throttle(dramatiq.get_broker())
        if throttle is None:
            raise RuntimeError("the project's broker has no Throttle middleware")
        self.store = throttle.store
        self.options = options
        self.environment = environment
        self.run = LevelRun(backlog, holders=options.scopes * options.limit, scopes=options.scopes)
        self.tenants: list[int] = []
        self.scope_keys: list[str] = []
        self.holders: list[deque[str]] = [deque() for _ in range(options.scopes)]
        self.waiters: list[deque[str]] = [deque() for _ in range(options.scopes)]
        self.instances: deque[Any] = deque()

    @property
    def pair_count(self) -> int:
        return self.options.executor_sample

    def operations(self) -> int:
        return self.run.holders + self.run.backlog + 2 * self.pair_count

    def prepare(self) -> None:
        """Tenants with the limit, then one instance per operation, in the order they will be used."""
        from sqlalchemy import insert, select

        from jobs.executors.throttling import provisioning_scope
        from resources.db import session_scope
        from resources.models import Instance, ServiceSettings

        label = f"{self.environment.namespace}-{self.run.backlog}"
        with session_scope() as session:
            rows = [
                ServiceSettings(name=f"{label}-{i}", backend="simulated", options={LIMIT_OPTION: self.options.limit})
                for i in range(self.options.scopes)
            ]
            session.add_all(rows)
            session.flush()
            self.tenants = [row.id for row in rows]
        self.environment.tenant_ids.extend(self.tenants)
        scopes = self.options.scopes
        active = min(self.run.backlog, scopes)
        order = (
            [i % scopes for i in range(self.run.holders)]
            + [i % scopes for i in range(self.run.backlog)]
            + [i % active for i in range(self.pair_count)]
        )
        uuids = [uuid.uuid4().hex for _ in order]
        with session_scope() as session:
            session.execute(
                insert(Instance),
                [
                    {"name": f"{label}-vm-{i}", "uuid": u, "service_settings_id": self.tenants[scope]}
                    for i, (u, scope) in enumerate(zip(uuids, order, strict=True))
                ],
            )
        loaded: dict[str, Any] = {}
        with session_scope() as session:
            for start in range(0, len(uuids), 500):
                chunk = uuids[start : start + 500]
                loaded.update(
                    (row.uuid, row) for row in session.scalars(select(Instance).where(Instance.uuid.in_(chunk)))
                )
            session.expunge_all()  # detached: execute() opens and commits a transaction of its own for each
        self.instances = deque(loaded[u] for u in uuids)
        self.scope_keys = [provisioning_scope(loaded[uuids[scope]]).key for scope in range(scopes)]

    def execute(self, scope: int, into: list[float], expected: str) -> None:
        from benchmarks.noop import NoopExecutor

        instance = self.instances.popleft()
        handle = timed(lambda: NoopExecutor.execute(instance, counter="scale:done", steps=STEPS), into)
        state = self.store.state_of(handle.id)
        if state != expected:
            raise RuntimeError(f"operation {handle.id} of scope {scope} is {state}, not {expected}")
        (self.holders if expected == "granted" else self.waiters)[scope].append(handle.id)

    def holders_phase(self) -> float:
        """Every scope's holders; returns the mean seconds per execute (the projection of the rest)."""
        times: list[float] = []
        for index in range(self.run.holders):
            self.execute(index % self.options.scopes, times, "granted")
        return sum(times) / len(times) if times else 0.0

    def build(self) -> None:
        quiet_gc()
        self.run.memory_before = used_memory(self.store.client, settle_s=self.options.settle_s)
        started = time.perf_counter()
        for index in range(self.run.backlog):
            self.execute(index % self.options.scopes, self.run.build_submits, "waiting")
        self.run.build_s = time.perf_counter() - started
        self.run.memory_after = used_memory(self.store.client)
        self.run.footprint = parked_footprint(
            self.store.client, self.store.prefix, self.waiters, self.scope_keys, self.options.sample
        )

    def pairs(self) -> None:
        from jobs.executors.base import OperationHandle

        quiet_gc()
        active = min(self.run.backlog, self.options.scopes)
        for index in range(self.pair_count):
            scope = index % active
            holder = self.holders[scope].popleft()
            handle = OperationHandle(holder, "", "NoopExecutor")
            timed(handle.cancel, self.run.steady_handoffs)
            expected = self.waiters[scope].popleft()
            if self.store.state_of(expected) != "granted":
                self.run.handoff_errors += 1
            self.holders[scope].append(expected)
            self.execute(scope, self.run.steady_submits, "waiting")

    def check(self) -> None:
        occupancy = self.store.occupancy()
        waiting = sum(occupancy[key][2] for key in self.scope_keys)
        self.run.backlog_intact = waiting == self.run.backlog and all(
            occupancy[key][1] == self.options.limit for key in self.scope_keys
        )


def run_executor_path(environment: Any, options: Options, started: float) -> list[dict[str, Any]]:
    """The executor-path levels that fit the budget, smallest first, each on fresh tenants and keys."""
    from benchmarks.throttle import clean_up
    from resources.redis_client import get_redis

    results: list[dict[str, Any]] = []
    seconds_each: float | None = None  # the last measured cost of one execute
    for backlog in sorted(options.executor_backlogs):
        level = ExecutorLevel(environment, backlog, options)
        if seconds_each is not None:
            fits, projected = fits_budget(
                level.operations(), seconds_each, elapsed_s=time.monotonic() - started, budget_s=options.budget_s
            )
            if not fits:
                results.append(_skipped(backlog, projected, seconds_each, options, started))
                continue
        try:
            level.prepare()
            console.print(f"executor path: {level.run.holders} holders for backlog {backlog}")
            seconds_each = level.holders_phase()
            fits, projected = fits_budget(
                level.operations() - level.run.holders,
                seconds_each,
                elapsed_s=time.monotonic() - started,
                budget_s=options.budget_s,
            )
            if not fits:
                results.append(_skipped(backlog, projected, seconds_each, options, started))
                continue
            console.print(f"executor path: building a backlog of {backlog} ({seconds_each * 1000:.1f} ms per execute)")
            level.build()
            console.print(
                f"executor path: backlog {backlog} built in {level.run.build_s:.1f} s; {level.pair_count} pairs"
            )
            level.pairs()
            level.check()
            results.append(level_summary(level.run, options.sample))
        finally:
            clean_up(environment)  # this level's rows and keys: the next level starts from nothing
            environment.tenant_ids.clear()
            # A server of our own: empty its tables too, or Redis shrinks them (emptied by the deletes) while
            # the next level builds, and that freed memory would hide part of the next backlog's.
            get_redis().flushall()
            gc.unfreeze()
    return results


def _skipped(backlog: int, projected: float, seconds_each: float, options: Options, started: float) -> dict[str, Any]:
    left = max(0.0, options.budget_s - (time.monotonic() - started))
    reason = (
        f"projected {projected:.0f} s at {seconds_each * 1000:.1f} ms per execute, {left:.0f} s of the "
        f"{options.budget_s:.0f} s budget left (raise --budget to run it)"
    )
    console.print(f"[yellow]executor path: backlog {backlog} skipped: {reason}[/]")
    return {"backlog": backlog, "skipped": reason}


# -- the run ---------------------------------------------------------------------------------------------------


def run(options: Options) -> dict[str, Any]:
    started = time.monotonic()
    with ExitStack() as stack:
        saved = dict(os.environ)
        stack.callback(_restore_environment, saved)
        # Always servers of our own: a shared Redis would blur the memory figures, a shared database the costs.
        os.environ.pop("REDIS_URL", None)
        os.environ.pop("DATABASE_URL", None)
        database_url: str | None = None
        environment = None
        if not options.executor_backlogs:
            os.environ["JOBS_BROKER"] = "stub"  # the project's broker is imported for its actors, never used
        else:
            from benchmarks.throttle import prepare_environment

            environment = prepare_environment(stack)
            environment.database = options.database
            if options.database == "postgresql":
                os.environ["DATABASE_URL"] = stack.enter_context(throwaway_postgres(options.postgres_url))
            database_url = shown_database_url(os.environ["DATABASE_URL"], environment.directory)
            # Imported only now: the project's modules read REDIS_URL and the namespace when imported.
            from resources.db import create_schema, get_engine

            create_schema()
            stack.callback(lambda: get_engine().dispose())  # before the database is dropped
        machine = machine_info("embedded")
        store_levels, message_bytes, version = run_store_path(options)
        machine["redis_version"] = version
        executor_levels = run_executor_path(environment, options, started) if environment is not None else []
        machine["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return build_result(
        options,
        store_levels,
        executor_levels,
        message_body_bytes=message_bytes,
        machine=machine,
        database_url=database_url,
        duration_s=time.monotonic() - started,
    )


def _restore_environment(saved: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(saved)


# -- output and command line -----------------------------------------------------------------------------------


def render(result: dict[str, Any], out: Console) -> None:
    for path in ("throttle_store_path", "executor_path"):
        figures = result[path]
        table = Table(title=f"{path}: {figures['what']}", title_justify="left")
        for column in ("backlog", "submit p50/p99 µs", "build last p50 µs", "hand-off p50/p99 µs", "bytes/parked"):
            table.add_column(column, justify="right")
        for level in figures["levels"]:
            if "skipped" in level:
                table.add_row(str(level["backlog"]), f"skipped: {level['skipped']}", "", "", "")
                continue
            submit, handoff = level["submit_us"]["steady"], level["handoff_us"]
            table.add_row(
                str(level["backlog"]),
                f"{submit['p50']} / {submit['p99']}",
                str(level["submit_us"]["build_last"]["p50"]),
                f"{handoff['p50']} / {handoff['p99']}",
                str(level["redis_memory"]["per_parked_op_bytes"]),
            )
        out.print(table)
        out.print(f"flat ratio: {figures['flat_ratio']}")
    out.print(f"parked message body: {result['parked_message_body_bytes']} bytes; run took {result['duration_s']} s")


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--levels", type=parse_levels, default=DEFAULT_LEVELS, help="backlog sizes (default 1000,10000,100000)"
    )
    parser.add_argument("--scopes", type=int, default=1_000, help="scopes the backlog is spread over (default 1000)")
    parser.add_argument("--limit", type=int, default=1, help="each scope's limit (default 1)")
    parser.add_argument("--sample", type=int, default=1_000, help="timed release/park pairs per level (default 1000)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds the store path's pairs are split into")
    parser.add_argument(
        "--executor-levels",
        default=None,
        help="backlog sizes of the executor path (default: --levels, as far as the budget allows; 'none': skip it)",
    )
    parser.add_argument(
        "--executor-sample", type=int, default=500, help="timed cancel/execute pairs per executor-path level"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help="seconds for the run; executor levels that would not fit are skipped",
    )
    parser.add_argument("--database", choices=DATABASES, default="sqlite", help="the executor path's database")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL server to create the throw-away database on (default: BENCH_POSTGRES_URL, or local)",
    )
    args = parser.parse_args(argv)
    for flag in ("scopes", "limit", "sample", "rounds", "executor_sample"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    executor_levels: tuple[int, ...] | None = None
    if args.executor_levels is not None:
        text = args.executor_levels.strip().lower()
        try:
            executor_levels = () if text == "none" else parse_levels(text)
        except argparse.ArgumentTypeError as error:
            parser.error(f"--executor-levels: {error}")
    return Options(
        levels=args.levels,
        scopes=args.scopes,
        limit=args.limit,
        sample=args.sample,
        rounds=args.rounds,
        executor_levels=executor_levels,
        executor_sample=args.executor_sample,
        budget_s=args.budget,
        database=args.database,
        postgres_url=args.postgres_url,
        json_output=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    # Every cancel logs a warning; without a handler Python writes each to stderr, flooding the progress lines.
    logging.getLogger().addHandler(logging.NullHandler())
    return report(
        lambda: run(options),
        json_output=options.json_output,
        render=render,
        exit_status=_failed_checks,
        undone="servers stopped, rows and keys deleted",
    )


def _failed_checks(result: dict[str, Any]) -> int:
    checks = [
        level["checks"]
        for path in ("throttle_store_path", "executor_path")
        for level in result[path]["levels"]
        if "checks" in level
    ]
    return 0 if all(all(check.values()) for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
