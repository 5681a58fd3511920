"""SQLite writers take turns through a file lock, and the next one starts the moment the last one ends.

SQLite lets one writer at a time in. A writer that finds the database locked sleeps in SQLite's busy
handler, in steps that grow to 100 ms, whether the lock is freed after one millisecond or not: with eight
worker threads and a web process writing a few milliseconds each, a waiter often slept on after the lock
was free. Here each write transaction first takes an exclusive ``flock`` on ``<database>.writers``: the kernel
queues the waiters and wakes one as soon as the lock is released, in this process or another, and a
waiting thread uses no CPU. SQLite's own lock and busy timeout stay underneath, for any writer that does
not take turns (another program, the ``sqlite3`` shell).

Written by hand because the file-lock libraries (filelock, fasteners) wait by polling with sleeps, which is
what this replaces. POSIX only; elsewhere connections write without taking turns, as before.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["TurnTakingConnection", "turns_path"]

#: Threads holding a turn, by thread id (a connection may be rolled back and closed on another thread). A
#: thread that opens a second write transaction while it holds one would wait for itself; it falls back to
#: SQLite's busy timeout instead, which reports the mistake as "database is locked".
_holders: dict[int, int] = {}
_holders_lock = threading.Lock()


def turns_path(database: str) -> str | None:
    """The lock file of a database file; None for an in-memory or URI database, which takes no turns."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return f"{database}.writers"


class TurnTakingConnection(sqlite3.Connection):
    """A sqlite3 connection (``factory=``) whose write transactions begin with :meth:`begin_write`."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self._turns_path = turns_path(os.fsdecode(database)) if fcntl is not None else None
        self._turns_fd: int | None = None
        self._holder: int | None = None

    def begin_write(self) -> None:
        """BEGIN IMMEDIATE once it is this connection's turn; the turn ends at commit, rollback or close."""
        self._take_turn()
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._end_turn()
            raise

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._end_turn()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._end_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._end_turn()
            if self._turns_fd is not None:
                os.close(self._turns_fd)
                self._turns_fd = None

    def _take_turn(self) -> None:
        thread = threading.get_ident()
        if self._turns_path is None or self._holder is not None or _holders.get(thread):
            return
        if self._turns_fd is None:
            self._turns_fd = os.open(self._turns_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._turns_fd, fcntl.LOCK_EX)  # blocks, without the GIL, until our turn
        self._holder = thread
        with _holders_lock:
            _holders[thread] = _holders.get(thread, 0) + 1

    def _end_turn(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None or self._turns_fd is None:
            return
        with _holders_lock:
            left = _holders.pop(holder, 1) - 1
            if left > 0:
                _holders[holder] = left
        fcntl.flock(self._turns_fd, fcntl.LOCK_UN)
