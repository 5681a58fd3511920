"""One Redis client per process and URL, shared by the parts that keep state in Redis."""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py without its hiredis extra: its own packer then
    _hiredis_pack = None

from .config import get_settings
from .replies_later import Line, Replies, Settler, read_replies, run_callbacks

__all__ = [
    "RoundTripScript",
    "ScriptCall",
    "ThreadConnections",
    "get_redis",
    "pipelined",
    "run_calls",
    "run_script",
    "settle_replies",
]


#: A thread's connection unused for this long is checked before its next command, as redis-py's pool checks
#: every connection it hands out: one that Redis closed meanwhile (a restart) is reconnected, not failed on.
CHECK_IDLE_AFTER_S = 0.1


#: Every ThreadConnections of this process, for ``settle_replies``.
_clients: weakref.WeakSet[ThreadConnections] = weakref.WeakSet()


class _Own(threading.local):
    line: Line | None = None


class ThreadConnections(redis.Redis):
    """A client whose commands run on a connection of the calling thread's own, kept between commands.

    redis-py's pool hands a connection out and takes it back around every command, checking the process id
    twice and probing the socket each time: about a fifth of the client's cost per command, on the dozen round
    trips of an operation. Here each thread keeps one connection of ``pool`` (redis-py's single-connection
    client), given back to the pool when the thread ends, and probed only after it sat unused (see
    ``CHECK_IDLE_AFTER_S``). Scripts, pipelines and everything else built on this client work as on any other.
    ``send_ahead`` sends commands without waiting for their replies (see ``resources.replies_later``).
    """

    def __init__(self, pool: redis.ConnectionPool) -> None:
        super().__init__(connection_pool=pool)
        self._own = _Own()
        self._settler = Settler()
        _clients.add(self)
        # A child process starts afresh: a connection of the parent's must not be shared with it.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._own = _Own()
        self._settler = Settler()

    def _line(self, *, settle: bool = True) -> Line:
        """This thread's line; with ``settle``, its owed replies read (and their callbacks run) first."""
        line = self._own.line
        if line is None:
            line = self._own.line = Line(
                redis.Redis(connection_pool=self.connection_pool, single_connection_client=True)
            )
        elif settle and line.owed:
            with line.lock:
                done = line.read_owed()
            run_callbacks(done)
        return line

    @staticmethod
    def _connection(line: Line) -> Any:
        """Under ``line.lock``: its connection, checked when it sat unused. Not while replies are owed on it: they
        would make it look closed."""
        now = time.monotonic()
        if not line.owed and now - line.last_used >= CHECK_IDLE_AFTER_S:
            _reconnect_if_closed(line.client.connection)
        line.last_used = now
        return line.client.connection

    def execute_command(self, *args: Any, **options: Any) -> Any:
        line = self._line()
        with line.lock:
            self._connection(line)
            return line.client.execute_command(*args, **options)

    def round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """``commands`` sent together on this thread's connection; their replies in order, an error reply as its
        exception. What ``pipeline(transaction=False).execute(raise_on_error=False)`` does, without a pipeline's
        bookkeeping (a connection taken from the pool and given back, a command stack, its observability
        records: several hundred function calls for three commands) and without response callbacks, which the
        commands it is for (EVALSHA, DEL) have none of. A lost connection is reconnected and the commands sent
        again, under the connection's retry policy, as a pipeline does."""
        line = self._line()
        with line.lock:
            connection = self._connection(line)
            packed = _packed(connection, commands)

            def send_and_read() -> list[Any]:
                connection.send_packed_command(packed)
                return read_replies(connection, len(commands))

            return connection.retry.call_with_retry(send_and_read, lambda _error: connection.disconnect())

    def send_ahead(self, commands: Sequence[Sequence[Any]], then: Callable[[Replies], None]) -> None:
        """Send ``commands`` as ``round_trip`` does, without waiting for their replies: ``then`` gets them (or the
        error that lost them) once they are read, before this thread's next command on this client or, if it makes
        none within ``replies_later.SETTLE_AFTER_S``, in the client's settler thread. A send that fails raises here,
        as ``round_trip`` would. Replies owed already stay owed: a burst of sends waits for none of them."""
        line = self._line(settle=False)
        with line.lock:
            connection = self._connection(line)
            packed = _packed(connection, commands)
            # No health check (a PING, its reply read) while replies are owed: it would read one of theirs.
            check_health = not line.owed
            connection.retry.call_with_retry(
                lambda: connection.send_packed_command(packed, check_health=check_health),
                lambda _error: connection.disconnect(),
            )
            line.owe(len(commands), then)
            self._settler.watch(line)

    def settle(self) -> None:
        """Read every reply owed on this client's connections, whichever thread sent the commands, and run their
        callbacks now."""
        self._settler.settle_all()  # every line owing replies is watched, this thread's too


def settle_replies() -> None:
    """Read the replies owed on every ``ThreadConnections`` of this process and run their callbacks now (see
    ``ThreadConnections.send_ahead``): whatever they do is done when this returns."""
    for client in list(_clients):
        client.settle()


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
