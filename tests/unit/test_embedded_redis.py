"""The embedded Redis a new user gets: real, private, and gone when stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import redis

from jobs.embedded_redis import EmbeddedRedis
from tests.fixtures import wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is not running.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_starts_a_real_server_and_stops_it():
    server = EmbeddedRedis()
    url = server.start()
    pid = server.process.pid
    directory = server.directory
    try:
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        server.stop()
    assert not _alive(pid)
    assert not os.path.exists(directory)


def test_server_dies_with_a_killed_parent():
    # Given a process that starts an embedded Redis and is then SIGKILLed
    script = textwrap.dedent(
        """
        import os, signal, sys
        from jobs.embedded_redis import EmbeddedRedis
        server = EmbeddedRedis()
        server.start()
        print(server.process.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    redis_pid = int(child.stdout.split()[0])

    # Then its Redis server does not outlive it
    wait_for(lambda: not os.path.exists(f"/proc/{redis_pid}") or not _alive(redis_pid), timeout_s=20)


def test_a_deep_tmpdir_does_not_break_the_socket(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with EmbeddedRedis() as url:
        assert redis.Redis.from_url(url).ping()
