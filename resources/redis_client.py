"""One Redis client per process and URL, shared by the parts that keep state in Redis."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py without its hiredis extra: its own packer then
    _hiredis_pack = None

from .config import get_settings

__all__ = ["RoundTripScript", "ScriptCall", "ThreadConnections", "get_redis", "pipelined", "run_calls", "run_script"]


#: A thread's connection unused for this long is checked before its next command, as redis-py's pool checks
#: every connection it hands out: one that Redis closed meanwhile (a restart) is reconnected, not failed on.
CHECK_IDLE_AFTER_S = 0.1


class _Own(threading.local):
    client: redis.Redis | None = None
    last_used: float = 0.0


class ThreadConnections(redis.Redis):
    """A client whose commands run on a connection of the calling thread's own, kept between commands.

    redis-py's pool hands a connection out and takes it back around every command, checking the process id
    twice and probing the socket each time: about a fifth of the client's cost per command, on the dozen round
    trips of an operation. Here each thread keeps one connection of ``pool`` (redis-py's single-connection
    client), given back to the pool when the thread ends, and probed only after it sat unused (see
    ``CHECK_IDLE_AFTER_S``). Scripts, pipelines and everything else built on this client work as on any other.
    """

    def __init__(self, pool: redis.ConnectionPool) -> None:
        super().__init__(connection_pool=pool)
        self._own = _Own()
        # A child process starts afresh: a connection of the parent's must not be shared with it.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._own = _Own()

    def _thread_client(self) -> redis.Redis:
        own = self._own
        client = own.client
        if client is None:
            client = own.client = redis.Redis(connection_pool=self.connection_pool, single_connection_client=True)
        now = time.monotonic()
        if now - own.last_used >= CHECK_IDLE_AFTER_S:
            _reconnect_if_closed(client.connection)
        own.last_used = now
        return client

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return self._thread_client().execute_command(*args, **options)

    def round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """``commands`` sent together on this thread's connection; their replies in order, an error reply as its
        exception. What ``pipeline(transaction=False).execute(raise_on_error=False)`` does, without a pipeline's
        bookkeeping (a connection taken from the pool and given back, a command stack, its observability
        records: several hundred function calls for three commands) and without response callbacks, which the
        commands it is for (EVALSHA, DEL) have none of. A lost connection is reconnected and the commands sent
        again, under the connection's retry policy, as a pipeline does."""
        connection = self._thread_client().connection
        assert connection is not None  # a single-connection client keeps one from its construction

        packed = _packed(connection, commands)

        def send_and_read() -> list[Any]:
            connection.send_packed_command(packed)
            replies: list[Any] = []
            for _command in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as error:
                    replies.append(error)
            return replies

        return connection.retry.call_with_retry(send_and_read, lambda _error: connection.disconnect())


def _reconnect_if_closed(connection: Any) -> None:
    """The pool's check of a connection it hands out: readable between two commands means closed by the server
    (or out of step); dropped then, so that the command about to be sent connects afresh."""
    if connection is None:
        return
    try:
        if connection.can_read():
            connection.disconnect()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        connection.disconnect()


@functools.cache
def _client_for(url: str) -> redis.Redis:
    return ThreadConnections(redis.ConnectionPool.from_url(url, decode_responses=True, health_check_interval=30))


def get_redis(url: str | None = None) -> redis.Redis:
    return _client_for(url or get_settings().broker_url)


def _packed(connection: Any, commands: Sequence[Sequence[Any]]) -> Any:
    """The commands in Redis's protocol. With hiredis, its packer takes each command whole: redis-py's packs with it
    too, but first passes every argument through its encoder in Python (about a tenth of the calls a worker
    makes per operation); the bytes are the same, and so is the refusal of what Redis cannot take."""
    if _hiredis_pack is None:
        return connection.pack_commands(commands)
    try:
        return [b"".join([_hiredis_pack(tuple(command)) for command in commands])]
    except TypeError as error:  # a bool, None or another object: redis-py's encoder refuses them so
        raise redis.DataError(f"{error} Convert it to bytes, a string, an int or a float first.") from None


def pipelined(client: redis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``commands`` (EVALSHA, DEL and other commands whose replies need no conversion) in one round trip; their
    replies in order, an error reply as its exception. On ``ThreadConnections``, on the thread's own connection
    (``ThreadConnections.round_trip``); on any other client, as a command, or several through a pipeline."""
    if isinstance(client, ThreadConnections):
        return client.round_trip(commands)
    if len(commands) == 1:  # a pipeline of one costs more than the command
        try:
            return [client.execute_command(*commands[0])]
        except redis.ResponseError as error:
            return [error]
    with client.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)


@dataclass(frozen=True)
class ScriptCall:
    """A Lua script call made ready to send, alone or with others in one round trip (``run_calls``)."""

    script: Script
    keys: Sequence[Any] = ()
    args: Sequence[Any] = ()


def run_calls(client: redis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Make ``calls`` in order, in one round trip; their replies, in order. A call whose script this server does
    not have yet (a first call, a restart) is made again on its own once the others ran, the script then loaded:
    only for calls that may run in either order, as repeating or reordering a call must not matter."""
    # EVALSHA by hand, even for one call: calling the script object costs a client command's bookkeeping, and a
    # pipeline given script objects would first ask the server whether it has them, a round trip of its own.
    replies = pipelined(
        client, [("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args) for call in calls]
    )
    for index, (call, reply) in enumerate(zip(calls, replies, strict=True)):
        if isinstance(reply, redis.exceptions.NoScriptError):
            replies[index] = call.script(keys=list(call.keys), args=list(call.args), client=client)
        elif isinstance(reply, Exception):
            raise reply
    return replies


def run_script(client: redis.Redis, script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
    """``script(keys=keys, args=args, client=client)``, as ``run_calls`` makes a call: on ``ThreadConnections``,
    without a client command's bookkeeping."""
    return run_calls(client, [ScriptCall(script, keys, args)])[0]


class RoundTripScript:
    """A registered script, called as a ``Script`` is (``script(keys=…, args=…)``) but made as ``run_script``
    makes it: for code that calls the script objects it holds, Dramatiq's Redis broker for one."""

    def __init__(self, client: redis.Redis, script: Script) -> None:
        self.client = client
        self.script = script

    def __call__(self, keys: Sequence[Any] | None = None, args: Sequence[Any] | None = None, client: Any = None) -> Any:
        return run_script(client or self.client, self.script, keys or (), args or ())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.script, name)  # sha, script, …
