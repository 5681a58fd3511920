"""What starting an operation costs the process that starts it: ``execute()`` in a transaction of its own, as a
web request calls it, next to sending a plain Dramatiq pipeline of as many steps.

Run from the repository root::

    python -m benchmarks.enqueue --json                          # SQLite, one JSON object on stdout
    python -m benchmarks.enqueue --json --database postgresql    # a throw-away PostgreSQL database

No worker runs, so nothing else competes for the machine: this is the part of the throughput benchmark's
(``throughput.py``) work that one thread does alone, and that bounds its executors' rounds. Each round makes
``--operations`` instances (untimed), then starts one five-step operation on each, one transaction per
operation (the caller's read of the instance, ``execute()`` and the commit, with its send), and sends as many
plain pipelines. Per operation: the wall time, and this process's CPU time (``time.process_time``: Redis's and
the database server's CPU are left out), medians of the rounds. The messages stay queued, unconsumed, until
the run deletes its keys and rows at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from .entry import report
from .throttle import clean_up, create_tenant, prepare_environment
from .throughput import (
    DATABASES,
    DEFAULT_POSTGRES_URL,
    PLAIN_NAMESPACE_ENV,
    STEPS,
    delete_keys,
    machine_info,
    shown_database_url,
    throwaway_postgres,
)

__all__ = ["VARIANTS", "Cost", "Options", "build_result", "main", "parse_options", "run"]

#: Plain Dramatiq's pipelines, the executor holding a throttle slot (as the throughput benchmark's does), and the
#: same executor holding none: the two ways ``execute()`` sends its first steps.
VARIANTS = ("plain_dramatiq", "executors", "executors_unthrottled")

console = Console(stderr=True)


@dataclass(frozen=True)
class Options:
    operations: int = 300
    rounds: int = 5
    warm_up: int = 50
    database: str = "sqlite"
    postgres_url: str = DEFAULT_POSTGRES_URL
    json_output: bool = False


@dataclass(frozen=True)
class Cost:
    """One round of one variant: operations started, and the wall and CPU seconds it took."""

    operations: int
    wall_s: float
    cpu_s: float

    @property
    def wall_ms_per_op(self) -> float:
        return self.wall_s * 1000 / self.operations

    @property
    def cpu_ms_per_op(self) -> float:
        return self.cpu_s * 1000 / self.operations


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 3)


def build_result(options: Options, costs: dict[str, list[Cost]], *, database_url: str) -> dict[str, Any]:
    """The JSON object: per variant, the median round's milliseconds per operation, and each executor's ratio to
    plain Dramatiq's pipelines."""
    figures = {
        name: {
            "wall_ms_per_op": _median([cost.wall_ms_per_op for cost in rounds]),
            "cpu_ms_per_op": _median([cost.cpu_ms_per_op for cost in rounds]),
            "rounds_wall_ms_per_op": [round(cost.wall_ms_per_op, 3) for cost in rounds],
        }
        for name, rounds in costs.items()
    }
    plain = figures["plain_dramatiq"]
    return {
        **{
            f"{name}_{figure}": figures[name][figure]
            for name in costs
            for figure in ("wall_ms_per_op", "cpu_ms_per_op")
        },
        **{
            f"{name}_wall_ratio_to_plain": round(figures[name]["wall_ms_per_op"] / plain["wall_ms_per_op"], 3)
            for name in costs
            if name != "plain_dramatiq"
        },
        "database": options.database,
        "database_url": database_url,
        "operations": options.operations,
        "rounds": options.rounds,
        "warm_up_operations": options.warm_up,
        "steps": STEPS,
        "variants": figures,
    }


def _timed(work: Callable[[], Any], operations: int) -> Cost:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return Cost(operations, time.perf_counter() - wall, time.process_time() - cpu)


def run(options: Options) -> dict[str, Any]:
    with ExitStack() as stack:
        environment = prepare_environment(stack)
        if options.database == "postgresql":
            os.environ["DATABASE_URL"] = stack.enter_context(throwaway_postgres(options.postgres_url))
        else:
            os.environ["DATABASE_URL"] = f"sqlite:///{environment.directory / 'bench.sqlite3'}"
        os.environ[PLAIN_NAMESPACE_ENV] = f"{environment.namespace}-plain"
        # Imported only now: they read REDIS_URL, the namespace and the database when they are imported.
        from benchmarks.noop import NoopExecutor, UnthrottledNoopExecutor
        from benchmarks.throughput import Executors, PlainDramatiq
        from resources.db import create_schema
        from resources.redis_client import settle_replies

        database_url = shown_database_url(os.environ["DATABASE_URL"], environment.directory)
        create_schema()
        stack.callback(clean_up, environment)
        stack.callback(settle_replies)  # before the keys go: the answers of the sends not waited for
        stack.callback(delete_keys, f"{environment.namespace}-plain:")
        counter = f"{environment.namespace}:bench:enqueue"
        send_pipelines = PlainDramatiq.send_pipelines

        def executors(count: int, label: str, executor: Any = NoopExecutor) -> Callable[[], Any]:
            ids = create_tenant(environment, label, limit=count + 1, instances=count).instance_ids
            return lambda: Executors._enqueue(ids, counter, executor)

        executors(options.warm_up, "warm-up")()
        executors(options.warm_up, "warm-up-unthrottled", UnthrottledNoopExecutor)()
        send_pipelines(options.warm_up, counter)
        costs: dict[str, list[Cost]] = {name: [] for name in VARIANTS}
        count = options.operations
        for number in range(1, options.rounds + 1):
            # Alternating, so that a change in the machine's state meets every variant alike.
            costs["plain_dramatiq"].append(_timed(lambda: send_pipelines(count, counter), count))
            costs["executors"].append(_timed(executors(count, f"round-{number}"), count))
            unthrottled = executors(count, f"round-{number}-unthrottled", UnthrottledNoopExecutor)
            costs["executors_unthrottled"].append(_timed(unthrottled, count))
            console.print(
                f"round {number}: "
                + ", ".join(f"{name} {costs[name][-1].wall_ms_per_op:.3f} ms/op" for name in VARIANTS)
            )
        result = build_result(options, costs, database_url=database_url)
        result["machine"] = machine_info(environment.redis)
    return result


def render(result: dict[str, Any], out: Console) -> None:
    table = Table(title=f"Starting {result['operations']} operations of {result['steps']} steps ({result['database']})")
    for column in ("variant", "wall ms/op", "CPU ms/op (this process)"):
        table.add_column(column)
    for name, figures in result["variants"].items():
        table.add_row(name, f"{figures['wall_ms_per_op']:.3f}", f"{figures['cpu_ms_per_op']:.3f}")
    out.print(table)
    for name in VARIANTS[1:]:
        out.print(f"{name} ÷ plain Dramatiq (wall): {result[f'{name}_wall_ratio_to_plain']}")


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {number}")
    return number


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.enqueue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=_at_least_one, default=Options.operations, help="per round")
    parser.add_argument("--rounds", type=_at_least_one, default=Options.rounds)
    parser.add_argument("--warm-up", type=_at_least_one, default=Options.warm_up, help="operations, untimed")
    parser.add_argument("--database", choices=DATABASES, default=Options.database)
    parser.add_argument(
        "--postgres-url", default=Options.postgres_url, help="where --database postgresql creates its database"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    return Options(
        operations=args.operations,
        rounds=args.rounds,
        warm_up=args.warm_up,
        database=args.database,
        postgres_url=args.postgres_url,
        json_output=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    return report(lambda: run(options), json_output=options.json_output, render=render, undone="keys and rows deleted")


if __name__ == "__main__":
    sys.exit(main())
