"""``jobs dev`` as a new user runs it: the project's Procfile on an embedded Redis and SQLite, stopped
with Ctrl-C; and a Procfile whose process dies, which stops the session."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from tests.integration.conftest import new_user_only

pytestmark = [pytest.mark.integration, new_user_only]

T = TypeVar("T")
PROJECT = Path(__file__).resolve().parents[2]
PROCESSES = ("release", "worker", "heavy", "background", "scheduler")

#: Run against the session's Redis and SQLite file, as another shell of the developer would.
OPERATION = """
import time
from jobs import app  # noqa: F401  (declares the actors on the broker of REDIS_URL)
from jobs.executors import InstanceCreateExecutor
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.db import session_scope
from resources.models import Instance, ServiceSettings, Volume

SimulatedCloud().configure(SimulatedConfig(latency_ms=(1, 5), build_ms=50, delete_ms=50, seed=1))
with session_scope() as session:
    tenant = ServiceSettings(name="dev-tenant", backend="simulated", options={})
    session.add(tenant)
    session.flush()
    instance = Instance(name="dev-vm", service_settings_id=tenant.id, flavor="small")
    session.add(instance)
    session.flush()
    session.add(Volume(name="dev-vm-disk", size_gb=10, instance_id=instance.id, service_settings_id=tenant.id))
    instance_id = instance.id
handle = InstanceCreateExecutor.execute(instance)
deadline = time.monotonic() + 30
while handle.status() == "running" and time.monotonic() < deadline:
    time.sleep(0.05)
with session_scope() as session:
    print(handle.status(), session.get(Instance, instance_id).state.value)
"""


class DevSession:
    """``python -m jobs dev`` in a session of its own (so that a Ctrl-C to its group reaches nothing else)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.namespace = env["JOBS_NAMESPACE"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobs", "dev", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, condition: Callable[[], T | None], timeout_s: float) -> T:
        """Poll ``condition`` until it returns a value; fail at once if the command ended without one."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                self.reader.join(5)
                value = condition()
                if value:
                    return value
                raise AssertionError(f"jobs dev exited ({self.process.returncode}) first:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout_s} s:\n{self.output}")
            time.sleep(0.05)

    def line_matching(self, pattern: str) -> re.Match[str] | None:
        return next((m for line in list(self.lines) if (m := re.match(pattern, line))), None)

    def prefixed(self, name: str) -> list[str]:
        return [line for line in list(self.lines) if re.match(rf"{re.escape(name)} +\| ", line)]

    def finish(self, timeout_s: float) -> int:
        returncode = self.process.wait(timeout=timeout_s)
        self.reader.join(5)
        return returncode

    def leftovers(self) -> list[psutil.Process]:
        """Every process started for this session (Redis included) carries its namespace in its environment."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("JOBS_NAMESPACE") == self.namespace:
                    found.append(process)
            except psutil.Error:  # gone, a zombie, or another user's
                continue
        return found

    def kill_everything(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for process in self.leftovers():
            process.kill()


@pytest.fixture
def new_user_env(tmp_path: Path) -> dict[str, str]:
    """No REDIS_URL, no DATABASE_URL: the embedded defaults, on a data directory and namespace of its own."""
    # BROKER_URL too: a new user has none, and RabbitMQ queues are shared by every test run on that server.
    unset = ("REDIS_URL", "DATABASE_URL", "BROKER_URL", "JOBS_BROKER")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["JOBS_DATA_DIR"] = str(tmp_path / "data")
    env["JOBS_NAMESPACE"] = f"jobs-dev-test-{uuid.uuid4().hex[:8]}"
    # Only for the CI budget: an idle worker's wait for messages lasts up to a second by default, which
    # its stop waits out.
    env["dramatiq_worker_timeout"] = "100"
    return env


@pytest.fixture
def start_dev(new_user_env: dict[str, str]) -> Iterator[Callable[..., DevSession]]:
    sessions: list[DevSession] = []

    def start(*args: str, cwd: Path) -> DevSession:
        sessions.append(DevSession(list(args), new_user_env, cwd))
        return sessions[-1]

    yield start
    for session in sessions:  # a failed test must not leave workers behind either
        session.kill_everything()


def test_dev_runs_the_procfile_serves_operations_and_stops_on_ctrl_c(start_dev, new_user_env, tmp_path):
    # Given `jobs dev` started outside the project (so it finds the project's own Procfile)
    dev = start_dev(cwd=tmp_path)
    redis_url = dev.wait_for(lambda: dev.line_matching(r"system +\| embedded Redis at (unix://\S+)$"), 60).group(1)
    dev.wait_for(lambda: dev.line_matching(r"system +\| release done$"), 60)

    # When an operation is executed against its Redis and its SQLite file (started as soon as the schema
    # exists, so that its interpreter starts while the workers boot: its messages wait for them in Redis)
    operation = subprocess.Popen(
        [sys.executable, "-c", OPERATION],
        env={**new_user_env, "REDIS_URL": redis_url},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Then every Procfile process logs behind its prefix, release having run to completion first
    dev.wait_for(lambda: all(dev.prefixed(name) for name in PROCESSES), timeout_s=60)
    started = dev.lines.index(next(line for line in dev.lines if re.match(r"system +\| worker started", line)))
    assert any(re.match(r"release +\| database at revision ", line) for line in dev.lines[:started]), dev.output

    # ... and its workers run the operation to completion
    stdout, stderr = operation.communicate(timeout=60)
    assert operation.returncode == 0, stderr + dev.output
    assert stdout.split() == ["succeeded", "OK"], stdout + stderr + dev.output
    assert (tmp_path / "data" / "jobs.sqlite3").exists()

    # When Ctrl-C reaches its process group, as a terminal sends it
    assert len(dev.leftovers()) >= 1 + len(PROCESSES)  # jobs dev, Redis, and at least one per running process
    os.killpg(dev.process.pid, signal.SIGINT)

    # Then every process stops gracefully, the command exits 130, and nothing of it is left running
    assert dev.finish(timeout_s=30) == 130, dev.output
    for name in PROCESSES[1:]:
        assert any(re.match(rf"system +\| {name} exited with code 0$", line) for line in dev.lines), dev.output
    assert dev.leftovers() == []


def test_a_process_that_exits_stops_the_others_and_fails_the_command(start_dev, tmp_path):
    # Given a Procfile with a long-running process and one that fails once the first is up
    procfile = tmp_path / "Procfile.test"
    procfile.write_text(
        "# a test Procfile\n"
        "sleeper: env DEV_GREETING=hello python -c \"import os, pathlib, time; pathlib.Path('sleeper.up').touch(); "
        "print(os.environ['DEV_GREETING']); time.sleep(120)\"\n"
        "\n"
        "boom: until [ -e sleeper.up ]; do sleep 0.05; done; echo failing; exit 3\n"
        "ignored: false\n"
    )

    # When it runs (from elsewhere: its processes run next to it), without the skipped one
    dev = start_dev("--procfile", str(procfile), "--skip", "ignored", cwd=tmp_path.parent)

    # Then the failure is reported with its code, the other process is stopped, and the command fails
    assert dev.finish(timeout_s=30) == 3, dev.output
    assert dev.prefixed("sleeper") == ["sleeper | hello"]
    assert dev.prefixed("boom") == ["boom    | failing"]
    assert "system  | boom exited with code 3; stopping the other processes" in dev.lines
    assert "system  | sleeper was killed by SIGTERM" in dev.lines
    assert not dev.prefixed("ignored") and "ignored" not in dev.output
    assert dev.leftovers() == []
