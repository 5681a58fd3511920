"""Starting and stopping real ``dramatiq`` worker processes (for ``jobs demo`` and integration tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["ManagedProcess", "start_process", "start_scheduler", "start_worker", "stop_all"]

#: How long a worker gets to finish its in-flight steps after SIGTERM before it is killed, seconds.
STOP_TIMEOUT_S = 30


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None
    _log: IO[bytes] | None
    _stop_requested: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.request_stop()
        self.wait_stopped()

    def request_stop(self) -> None:
        """SIGTERM, once: the dramatiq master forwards it to its worker processes and waits for their steps;
        the scheduler hands its lease over and exits on it. Only the group leader gets it, and only once: a
        worker signalled twice exits at once."""
        if self.alive() and not self._stop_requested:
            self.process.send_signal(signal.SIGTERM)
            self._stop_requested = True

    def wait_stopped(self) -> None:
        """Wait for the exit that ``request_stop`` asked for; SIGKILL the group after ``STOP_TIMEOUT_S``."""
        if self.alive():
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of the group left behind
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_all(processes: Iterable[ManagedProcess]) -> None:
    """Stop several processes at once: each takes a second or two to shut down (Dramatiq's processes look
    at their stop flag once a second), and they can all take it together."""
    running = list(processes)
    for process in running:
        process.request_stop()
    for process in running:
        process.wait_stopped()


def start_process(
    name: str, command: Sequence[str], *, env: Mapping[str, str] | None = None, log_path: Path | None = None
) -> ManagedProcess:
    """Start ``command`` in its own process group with this environment plus ``env``."""
    environment = {**os.environ, **(env or {})}
    environment.pop("JOBS_BROKER", None)  # these processes always use the real broker
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
    process = subprocess.Popen(
        list(command),
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ManagedProcess(name, process, log_path, log)


def start_worker(
    name: str,
    *,
    queues: Sequence[str],
    processes: int = 1,
    threads: int = 4,
    module: str = "jobs.app",
    extra_modules: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    prefetch: int | None = None,
) -> ManagedProcess:
    """``dramatiq <module> [extra modules] --queues …``, as the Procfile's worker processes run it."""
    environment = dict(env or {})
    if prefetch is not None:
        # Dramatiq's own knob: without it a busy one-thread worker holds the next message in memory.
        environment["dramatiq_queue_prefetch"] = str(prefetch)
    command = [
        sys.executable,
        "-m",
        "dramatiq",
        module,
        *extra_modules,
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--queues",
        *queues,
    ]
    return start_process(name, command, env=environment, log_path=log_path)


def start_scheduler(
    name: str = "scheduler",
    *,
    modules: Sequence[str] = ("scheduler.app",),
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> ManagedProcess:
    """``python -m scheduler run``, as the Procfile's scheduler process runs it."""
    command = [sys.executable, "-m", "scheduler", "run", *modules]
    return start_process(name, command, env=env, log_path=log_path)
