"""Instructions per operation, counted by valgrind's callgrind: the executors' five-step no-op operation and plain
Dramatiq's five-step pipeline, side by side, in figures that do not move with the machine's load.

Run from the repository root (needs ``valgrind`` on the PATH; about four minutes)::

    python -m benchmarks.instructions --json
    python -m benchmarks.instructions --operations 50     # quicker; a table instead of JSON

Throughput on a shared machine swings by a fifth from one run to the next, as other tenants take the CPUs; a
change worth a few percent cannot be seen in it. Callgrind counts the instructions a process executes instead,
and gives the same count for the same work whatever else runs (two runs here differ by less than 0.1%).

Each variant runs in a child process under callgrind: it enqueues N operations the way ``throughput.py`` does
(the executors: ``NoopExecutor.execute`` in a transaction each; plain Dramatiq: ``pipeline(...).run()``), then
an in-process worker of one thread runs them all. It runs twice, with ``--warm-up`` operations and with
``--warm-up`` + ``--operations``; the difference, divided by ``--operations``, is the cost of one operation
without the start-up (imports, connections, schema). What the count leaves out: Redis's and PostgreSQL's own
work, and the kernel's (system calls, context switches), which ``throughput.py``'s CPU figures include.

With REDIS_URL set it uses that server; otherwise each child starts a private embedded Redis. SQLite is a file
in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dramatiq.middleware import Middleware
from rich.console import Console
from rich.table import Table

from .entry import report

__all__ = ["main", "run"]

VARIANTS = ("plain_dramatiq", "executors")
STEPS = 5
#: The periodic work of a worker process (heartbeats, relay, maintenance) runs by the clock, and under callgrind
#: the clock runs fifty times slower than the work: made rare here, so that the count is the operations'.
QUIET = {
    "JOBS_THROTTLE_HEARTBEAT_S": "250",
    "JOBS_THROTTLE_LEASE_S": "300",
    "JOBS_BROKER_MAINTENANCE_INTERVAL_S": "600",
    "JOBS_OUTBOX_RELAY_INTERVAL_S": "600",
}
_TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def count(variant: str, operations: int) -> int:
    """Instructions callgrind counted in a child that runs ``operations`` operations of ``variant``."""
    with tempfile.TemporaryDirectory(prefix="jobs-instructions-") as directory:
        out = Path(directory) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            variant,
            str(operations),
        ]
        done = subprocess.run(command, capture_output=True, env={**os.environ, **QUIET}, check=False)
        if done.returncode != 0 or not out.exists():
            tail = done.stderr.decode(errors="replace")[-2000:]
            raise RuntimeError(f"{variant} with {operations} operations failed under callgrind:\n{tail}")
        found = _TOTALS.search(out.read_bytes())
        if found is None:
            raise RuntimeError(f"no instruction total in callgrind's output for {variant}")
        return int(found.group(1))


def run(operations: int, warm_up: int) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise SystemExit(
            "valgrind is not on the PATH: install it (Debian: apt-get install valgrind) to count instructions"
        )
    started = time.monotonic()
    per_op: dict[str, float] = {}
    for variant in VARIANTS:
        # The two sizes side by side: instructions do not depend on what else runs.
        with ThreadPoolExecutor(max_workers=2) as pool:
            small, large = pool.map(count, (variant, variant), (warm_up, warm_up + operations))
        per_op[variant] = (large - small) / operations
    plain, executors = per_op["plain_dramatiq"], per_op["executors"]
    return {
        "plain_dramatiq_instructions_per_op": round(plain),
        "executors_instructions_per_op": round(executors),
        "ratio_executors_to_plain": round(executors / plain, 3),
        "operations": operations,
        "warm_up_operations": warm_up,
        "steps": STEPS,
        "counted": "this process's user-space instructions (not Redis's, the database server's or the kernel's)",
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "duration_s": round(time.monotonic() - started, 1),
    }


# -- the child, under callgrind ------------------------------------------------------------------------------


class _LastSteps(Middleware):
    """Counts the operations whose last step (the one given ``counter``) ran in this process, waking ``wait`` when
    all have: no polling, whose cost under callgrind would grow with the wall-clock time."""

    def __init__(self, counter: str, target: int) -> None:
        self.counter, self.target, self.seen = counter, target, 0
        self.done = threading.Event()

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        if exception is None and message.args and message.args[0] == self.counter:
            self.seen += 1  # one worker thread: no lock needed
            if self.seen >= self.target:
                self.done.set()

    def wait(self) -> None:
        if not self.done.wait(timeout=3600):
            raise RuntimeError(f"only {self.seen} of {self.target} operations ran within an hour")


def _executors(operations: int) -> None:
    from benchmarks.throttle import create_tenant, prepare_environment

    with ExitStack() as stack:
        environment = prepare_environment(stack)
        import dramatiq

        import benchmarks.noop  # noqa: F401 - the executors' actors, on the project's broker
        from benchmarks.noop import NoopExecutor
        from jobs.broker import broker
        from resources.db import create_schema, session_scope
        from resources.models import Instance

        create_schema()
        tenant = create_tenant(environment, "instructions", limit=operations + 1, instances=operations)
        counter = f"{environment.namespace}:instructions:done"
        for instance_id in tenant.instance_ids:
            with session_scope() as session:
                NoopExecutor.execute(session.get(Instance, instance_id), counter=counter, steps=STEPS)
        last_steps = _LastSteps(counter, operations)
        broker.add_middleware(last_steps)
        broker.emit_after("process_boot")
        worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=1000)
        worker.start()
        try:
            last_steps.wait()
        finally:
            worker.stop()  # after the last step's record: a stop lets the message under way finish


def _plain(operations: int) -> None:
    from benchmarks.throttle import prepare_environment
    from benchmarks.throughput import PLAIN_NAMESPACE_ENV

    with ExitStack() as stack:
        environment = prepare_environment(stack)
        os.environ[PLAIN_NAMESPACE_ENV] = f"{environment.namespace}-plain"
        import dramatiq
        import redis

        from benchmarks.noop_plain import broker, plain_step

        counter = f"{environment.namespace}-plain:done"
        for _ in range(operations):
            messages = [plain_step.message_with_options(pipe_ignore=True) for _ in range(STEPS - 1)]
            messages.append(plain_step.message_with_options(args=(counter,), pipe_ignore=True))
            dramatiq.pipeline(messages, broker=broker).run()
        last_steps = _LastSteps(counter, operations)
        broker.add_middleware(last_steps)
        worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=1000)
        worker.start()
        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        try:
            last_steps.wait()
        finally:
            worker.stop()
            keys = list(client.scan_iter(f"{environment.namespace}-plain:*", count=1000))
            if keys:
                client.delete(*keys)


# -- output and command line ---------------------------------------------------------------------------------


def render(result: dict[str, Any], out: Console) -> None:
    table = Table(title=f"instructions per operation of {result['steps']} no-op steps ({result['counted']})")
    for column in ("variant", "instructions per operation"):
        table.add_column(column)
    table.add_row("plain Dramatiq", f"{result['plain_dramatiq_instructions_per_op']:,}")
    table.add_row("executors", f"{result['executors_instructions_per_op']:,}")
    out.print(table)
    out.print(f"executors / plain Dramatiq: {result['ratio_executors_to_plain']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--operations", type=int, default=100, help="operations counted (default 100)")
    parser.add_argument("--warm-up", type=int, default=20, help="operations of the run subtracted (default 20)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        variant, operations = options.child[0], int(options.child[1])
        (_executors if variant == "executors" else _plain)(operations)
        return 0
    if options.operations < 1 or options.warm_up < 1:
        parser.error("--operations and --warm-up must be positive")
    return report(
        lambda: run(options.operations, options.warm_up),
        json_output=options.json,
        render=render,
        undone="child processes stopped",
    )


if __name__ == "__main__":
    sys.exit(main())
