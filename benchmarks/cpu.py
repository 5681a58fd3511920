"""Where a benchmark's CPU time goes: the whole machine, a group of worker processes, this process, Redis.

Read from Linux's ``/proc`` and from Redis's ``INFO cpu``; a reading that cannot be made is None."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CpuReading", "group_cpu_s", "machine_cpu_s", "read_cpu", "redis_cpu_s"]


def machine_cpu_s() -> float | None:
    """CPU seconds the machine has spent busy since it booted, over all its CPUs (Linux's /proc/stat); None
    elsewhere. Machine-wide on purpose: an operation's cost is also in Redis, the database server and the
    worker processes, and a round's difference of two readings counts all of it."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle and iowait; guest time is counted in user already
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def group_cpu_s(group_id: int) -> float:
    """CPU seconds (user + system) spent so far by the live processes of a process group (Linux only)."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        if int(fields[2]) == group_id:  # pgrp
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(client: Any) -> float | None:
    """CPU seconds (user + system) the Redis server has spent since it started, all its threads."""
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except Exception:  # a server that hides INFO (a managed one) still leaves the other figures
        return None


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds spent so far: by the machine, by this process, by the worker processes, by Redis."""

    machine: float | None
    this_process: float
    workers: float | None
    redis: float | None

    def since(self, before: CpuReading) -> dict[str, float | None]:
        """What each part spent between ``before`` and this reading; ``rest`` is the machine's CPU that none of
        the other three spent (the database server, other processes)."""
        spent = {
            "machine": _minus(self.machine, before.machine),
            "this_process": self.this_process - before.this_process,
            "workers": _minus(self.workers, before.workers),
            "redis": _minus(self.redis, before.redis),
        }
        parts = [spent[part] for part in ("this_process", "workers", "redis")]
        known = [seconds for seconds in parts if seconds is not None]
        machine = spent["machine"]
        spent["rest"] = None if machine is None or len(known) < len(parts) else max(0.0, machine - sum(known))
        return spent


def read_cpu(worker_groups: list[int], redis_client: Any) -> CpuReading:
    """One reading of every part; ``worker_groups`` are the process groups of the worker processes."""
    workers = sum(group_cpu_s(group) for group in worker_groups) if Path("/proc").is_dir() else None
    return CpuReading(machine_cpu_s(), time.process_time(), workers, redis_cpu_s(redis_client))


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before
