"""Replies read later: commands sent on a thread's Redis connection without waiting for the answer.

A sender that can go on without the answer (the committing process admitting an operation: its outbox row, and
the relay behind it, cover whatever the reply would say went wrong) sends its commands and returns. The replies
are read, and the sender's callback run with them, before the thread's next command on that connection, when
they have long arrived; or, if the thread makes none within ``SETTLE_AFTER_S``, by the client's settler thread.
Redis answers a connection's commands in order, so whoever reads next reads them first.

Written by hand: redis-py's clients read each reply right after its command, and its asyncio client would need an
event loop in every caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["Line", "Replies", "Settler", "read_replies", "run_callbacks"]

logger = logging.getLogger(__name__)

#: How long replies may wait unread before the settler reads them (a thread that sent and then went quiet).
SETTLE_AFTER_S = 0.02
#: What a callback gets: the replies in order (an error reply as its exception), or the error that lost them.
Replies = list[Any] | Exception
Callback = Callable[[Replies], None]


@dataclass(frozen=True)
class _Owed:
    count: int
    then: Callback
    sent_at: float


class Line:
    """A thread's connection (``client``: redis-py's single-connection client) and the replies owed on it. Whoever
    uses the connection holds ``lock``: its thread, or the settler reading what the thread left unread."""

    __slots__ = ("client", "last_used", "lock", "owed")

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.last_used = 0.0
        self.lock = threading.Lock()
        self.owed: deque[_Owed] = deque()

    def owe(self, count: int, then: Callback) -> None:
        """``count`` replies of commands just sent (under ``lock``) go to ``then``."""
        self.owed.append(_Owed(count, then, time.monotonic()))

    def read_owed(self) -> list[tuple[Callback, Replies]]:
        """Under ``lock``: read every owed reply; the callbacks to run (outside the lock) with what they get."""
        done: list[tuple[Callback, Replies]] = []
        connection = self.client.connection
        while self.owed:
            owed = self.owed.popleft()
            try:
                done.append((owed.then, read_replies(connection, owed.count)))
            except Exception as error:  # the connection is lost, and with it every reply still owed on it
                connection.disconnect()
                done.append((owed.then, error))
                done.extend((later.then, error) for later in self.owed)
                self.owed.clear()
        return done

    def due_at(self) -> float | None:
        """When the oldest owed reply is due for the settler; None when none is owed."""
        return self.owed[0].sent_at + SETTLE_AFTER_S if self.owed else None


def read_replies(connection: Any, count: int) -> list[Any]:
    """The next ``count`` replies on ``connection``, an error reply as its exception (others raise)."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except redis.ResponseError as error:
            replies.append(error)
    return replies


def run_callbacks(done: list[tuple[Callback, Replies]]) -> None:
    """Run each callback with what it gets; a callback's error is logged, never passed on to the thread that
    happened to read the replies (which was about to do something else)."""
    for then, replies in done:
        try:
            then(replies)
        except Exception:
            logger.exception("a callback of replies read later failed")


class Settler:
    """A thread that reads the owed replies of lines whose thread went quiet. Started with the first line it is
    given; woken when a line starts to owe replies, and then once per ``SETTLE_AFTER_S`` while one owes."""

    def __init__(self) -> None:
        self._lines: set[Line] = set()
        self._changed = threading.Condition()
        self._started = False

    def watch(self, line: Line) -> None:
        """Under ``line.lock``, after ``line.owe``: make sure the settler looks at ``line``."""
        with self._changed:
            if line in self._lines:
                return
            self._lines.add(line)
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="redis-reply-settler", daemon=True).start()
            self._changed.notify()

    def settle_all(self) -> None:
        """Read every line's owed replies now and run their callbacks (a flush, say, before looking at what they
        leave behind)."""
        with self._changed:
            lines = list(self._lines)
        for line in lines:
            if not line.owed:  # settled by its thread, which may be in a blocking command now, holding the lock
                continue
            with line.lock:
                done = line.read_owed()
            run_callbacks(done)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._lines:
                    self._changed.wait()
                lines = list(self._lines)
            wake_at = time.monotonic() + SETTLE_AFTER_S
            for line in lines:
                line_wakes_at = self._look_at(line)
                if line_wakes_at is not None:
                    wake_at = min(wake_at, line_wakes_at)
            with self._changed:
                self._changed.wait(max(0.001, wake_at - time.monotonic()))

    def _look_at(self, line: Line) -> float | None:
        """Settle ``line`` if its oldest reply is due; when to look again (None: it owes nothing, forgotten)."""
        if not line.lock.acquire(blocking=False):
            return time.monotonic() + SETTLE_AFTER_S  # its thread is using it, and reads what it owes first
        done: list[tuple[Callback, Replies]] = []
        try:
            due_at = line.due_at()
            if due_at is not None and due_at <= time.monotonic():
                done = line.read_owed()
                due_at = None
            if due_at is None:
                with self._changed:  # under the line's lock: a reply owed from now on watches the line again
                    self._lines.discard(line)
        finally:
            line.lock.release()
        run_callbacks(done)
        return due_at
