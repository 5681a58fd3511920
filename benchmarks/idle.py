"""What idle workers cost, and how fast they pick up work: the project's waking consumer next to stock Dramatiq.

Run from the repository root::

    python -m benchmarks.idle --json                # one JSON object on stdout (progress on stderr)
    python -m benchmarks.idle --idle-s 5 --samples 10

Three variants, one after the other, each on the same number of worker processes and threads, each under
Redis keys of its own:

- ``plain_dramatiq_10ms``: a stock ``RedisBroker`` (``noop_plain.py``) with ``dramatiq_worker_timeout=10``,
  the setting that stock Dramatiq needs to start new work within about 10 ms: its idle consumers poll;
- ``plain_dramatiq_default``: the same on Dramatiq's default timeout of a second;
- ``project``: the project's workers (``dramatiq jobs.app``) as the Procfile runs them, on the default
  timeout: an idle consumer blocks until an enqueue wakes it.

For each: after the workers are up and have run a warm-up message, ``--idle-s`` seconds of nothing, over
which it reads the CPU time of the worker processes (Linux's ``/proc``) and the commands Redis processed
(``INFO stats``); then ``--samples`` single messages, each sent after an idle gap of 0.2-0.5 s, each timed
from its enqueue to its actor's start (the actor stamps the time it starts). Ratios are the project's
figure over each baseline's. With REDIS_URL set it uses that server (other clients' commands then count
too); otherwise a private embedded Redis. Every worker process and key it made is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jobs.processes import ManagedProcess, start_worker

from .cpu import group_cpu_s
from .entry import report
from .throttle import BOOT_TIMEOUT_S, prepare_environment
from .throughput import PLAIN_NAMESPACE_ENV, PLAIN_QUEUE, delete_keys, machine_info

__all__ = ["Figures", "main", "run"]

VARIANTS = ("plain_dramatiq_10ms", "plain_dramatiq_default", "project")
#: Longest wait for one stamped message, seconds.
STAMP_TIMEOUT_S = 30
console = Console(stderr=True)


@dataclass(frozen=True)
class Figures:
    idle_cpu_percent: float
    redis_commands_per_s: float
    pick_up_ms: list[float]

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.pick_up_ms)
        return {
            "idle_cpu_percent": round(self.idle_cpu_percent, 2),
            "redis_commands_per_s": round(self.redis_commands_per_s, 1),
            "pick_up_ms_p50": round(statistics.median(ordered), 2),
            "pick_up_ms_max": round(ordered[-1], 2),
        }


def _commands_processed(client: Any) -> int:
    return int(client.info("stats")["total_commands_processed"])


class Variant:
    def __init__(self, name: str, namespace: str, processes: int, threads: int) -> None:
        self.name, self.namespace, self.processes, self.threads = name, namespace, processes, threads

    def start(self, stack: ExitStack, logs: Path) -> ManagedProcess:
        if self.name == "project":
            worker = start_worker(
                self.name,
                queues=["default"],
                processes=self.processes,
                threads=self.threads,
                extra_modules=["benchmarks.noop"],
                log_path=logs / f"{self.name}.log",
            )
        else:
            env = {PLAIN_NAMESPACE_ENV: self.plain_namespace}
            if self.name == "plain_dramatiq_10ms":
                env["dramatiq_worker_timeout"] = "10"
            worker = start_worker(
                self.name,
                queues=[PLAIN_QUEUE],
                processes=self.processes,
                threads=self.threads,
                module="benchmarks.noop_plain:broker",
                env=env,
                log_path=logs / f"{self.name}.log",
            )
        stack.callback(worker.stop)
        return worker

    @property
    def plain_namespace(self) -> str:
        # One for both stock variants: this process imports their broker module once.
        return f"{self.namespace}-plain"

    def send_stamp(self, key: str) -> None:
        if self.name == "project":
            from benchmarks.noop import stamp_step

            stamp_step.send(key)
        else:
            from benchmarks.noop_plain import plain_stamp

            plain_stamp.send(key)


def _stamp_once(
    variant: Variant, client: Any, key: str, worker: ManagedProcess, *, timeout_s: float = STAMP_TIMEOUT_S
) -> float:
    """Send one stamped message and wait for its stamp; its pick-up time, ms."""
    count = client.llen(key)
    sent = time.time()
    variant.send_stamp(key)
    deadline = time.monotonic() + timeout_s
    while client.llen(key) <= count:
        if not worker.alive():
            raise RuntimeError(f"{variant.name}: its worker exited; see its log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{variant.name}: a message did not start within {timeout_s} s")
        time.sleep(0.001)
    return (float(client.lindex(key, -1)) - sent) * 1000


def measure(variant: Variant, *, idle_s: float, samples: int, logs: Path) -> Figures:
    from resources.redis_client import get_redis

    client = get_redis()
    key = f"{variant.namespace}:stamps:{variant.name}"
    if variant.name != "project":
        os.environ[PLAIN_NAMESPACE_ENV] = variant.plain_namespace  # before this process imports noop_plain
    with ExitStack() as stack:
        worker = variant.start(stack, logs)
        # Up and consuming once a warm-up message has run (its pick-up pays for the boot).
        booting = time.monotonic()
        _stamp_once(variant, client, key, worker, timeout_s=BOOT_TIMEOUT_S)
        console.print(f"{variant.name}: workers ready in {time.monotonic() - booting:.1f} s; idle for {idle_s} s")
        time.sleep(1.0)  # let the warm-up's after-work settle before the idle window opens
        cpu_before, commands_before, started = group_cpu_s(worker.process.pid), _commands_processed(client), time.time()
        time.sleep(idle_s)  # the idle window itself: nothing is sent
        cpu_after, commands_after, ended = group_cpu_s(worker.process.pid), _commands_processed(client), time.time()
        window = ended - started
        pick_ups = []
        for _ in range(samples):
            time.sleep(random.uniform(0.2, 0.5))  # an idle gap, as between a platform's requests
            pick_ups.append(_stamp_once(variant, client, key, worker))
        console.print(f"{variant.name}: pick-up p50 {statistics.median(pick_ups):.1f} ms")
    return Figures(
        idle_cpu_percent=(cpu_after - cpu_before) / window * 100,
        redis_commands_per_s=(commands_after - commands_before - 1) / window,  # less the first INFO
        pick_up_ms=pick_ups,
    )


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


def run(*, idle_s: float, samples: int, processes: int, threads: int) -> dict[str, Any]:
    started = time.monotonic()
    figures: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        environment = prepare_environment(stack)
        logs = environment.logs
        logs.mkdir(parents=True, exist_ok=True)
        stack.callback(delete_keys, f"{environment.namespace}")
        from resources.db import create_schema  # only now: it reads DATABASE_URL when imported

        create_schema()
        machine = machine_info(environment.redis)
        for name in VARIANTS:
            variant = Variant(name, environment.namespace, processes, threads)
            figures[name] = measure(variant, idle_s=idle_s, samples=samples, logs=logs).as_dict()
    ours = figures["project"]
    result: dict[str, Any] = {
        "processes": processes,
        "threads": threads,
        "idle_s": idle_s,
        "samples": samples,
        "variants": figures,
        "machine": machine,
        "duration_s": round(time.monotonic() - started, 1),
    }
    for baseline in VARIANTS[:-1]:
        theirs = figures[baseline]
        result[f"idle_cpu_ratio_vs_{baseline}"] = _ratio(ours["idle_cpu_percent"], theirs["idle_cpu_percent"])
        result[f"redis_commands_ratio_vs_{baseline}"] = _ratio(
            ours["redis_commands_per_s"], theirs["redis_commands_per_s"]
        )
        result[f"pick_up_p50_ratio_vs_{baseline}"] = _ratio(ours["pick_up_ms_p50"], theirs["pick_up_ms_p50"])
    return result


def render(result: dict[str, Any], out: Console) -> None:
    table = Table(
        title=f"{result['processes']} worker processes x {result['threads']} threads, idle {result['idle_s']} s",
        title_justify="left",
    )
    for column in ("variant", "idle CPU %", "Redis commands/s", "pick-up p50 ms", "pick-up max ms"):
        table.add_column(column)
    for name, row in result["variants"].items():
        table.add_row(
            name,
            str(row["idle_cpu_percent"]),
            str(row["redis_commands_per_s"]),
            str(row["pick_up_ms_p50"]),
            str(row["pick_up_ms_max"]),
        )
    out.print(table)


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--idle-s", type=float, default=10.0, help="length of the idle window, s (default 10)")
    parser.add_argument("--samples", type=int, default=20, help="timed pick-ups per variant (default 20)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes per variant (default 2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process (default 8)")
    options = parser.parse_args(argv)
    for name in ("idle_s", "samples", "processes", "threads"):
        if getattr(options, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be above 0, got {getattr(options, name)}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    return report(
        lambda: run(
            idle_s=options.idle_s, samples=options.samples, processes=options.processes, threads=options.threads
        ),
        json_output=options.json,
        render=render,
    )


if __name__ == "__main__":
    sys.exit(main())
