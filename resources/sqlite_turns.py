"""SQLite writers take turns through a file lock, and the next one starts the moment the last one ends.

SQLite lets one writer at a time in. A writer that finds the database locked sleeps in SQLite's busy
handler, in steps that grow to 100 ms, whether the lock is freed after one millisecond or not: with eight
worker threads and a web process writing a few milliseconds each, a waiter often slept on after the lock
was free. Here each write transaction first takes an exclusive ``flock`` on ``<database>.writers``: the kernel
queues the waiters and wakes one as soon as the lock is released, in this process or another, and a
waiting thread uses no CPU. SQLite's own lock and busy timeout stay underneath, for any writer that does
not take turns (another program, the ``sqlite3`` shell).

Worker processes write in the background lane (``write_in_background_lane``): their writers first queue
among themselves on ``<database>.writers.background``, and only the one at its head queues for the turn. A web
request's transaction, which someone is waiting for, then waits behind at most one worker's write instead of
behind every worker thread that wants to write; the workers' writes take no longer in all, as they are one at a
time either way.

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

__all__ = ["TurnTakingConnection", "turns_path", "write_in_background_lane"]

#: Threads holding a turn, by thread id (a connection may be rolled back and closed on another thread). A
#: thread that opens a second write transaction while it holds one would wait for itself; it falls back to
#: SQLite's busy timeout instead, which reports the mistake as "database is locked".
_holders: dict[int, int] = {}
_holders_lock = threading.Lock()
#: Whether this process's connections write in the background lane (see ``write_in_background_lane``).
_in_background_lane = False


def write_in_background_lane() -> None:
    """This process's writers queue behind one another before they queue for the turn (a worker process)."""
    global _in_background_lane
    _in_background_lane = True


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
        self._lane_fd: int | None = None
        self._holder: int | None = None
        self._lane_held = False
        #: In the background lane: None follows the process (``write_in_background_lane``).
        self.background: bool | None = None

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
            for descriptor in (self._turns_fd, self._lane_fd):
                if descriptor is not None:
                    os.close(descriptor)
            self._turns_fd = self._lane_fd = None

    def _take_turn(self) -> None:
        thread = threading.get_ident()
        if self._turns_path is None or self._holder is not None or _holders.get(thread):
            return
        if self._turns_fd is None:
            self._turns_fd = os.open(self._turns_path, os.O_RDWR | os.O_CREAT, 0o600)
        if self._writes_in_background():
            if self._lane_fd is None:
                self._lane_fd = os.open(f"{self._turns_path}.background", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lane_fd, fcntl.LOCK_EX)  # the head of the lane, then the turn
            self._lane_held = True
        try:
            fcntl.flock(self._turns_fd, fcntl.LOCK_EX)  # blocks, without the GIL, until our turn
        except BaseException:
            self._leave_lane()
            raise
        self._holder = thread
        with _holders_lock:
            _holders[thread] = _holders.get(thread, 0) + 1

    def _writes_in_background(self) -> bool:
        return _in_background_lane if self.background is None else self.background

    def _end_turn(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None or self._turns_fd is None:
            return
        with _holders_lock:
            left = _holders.pop(holder, 1) - 1
            if left > 0:
                _holders[holder] = left
        fcntl.flock(self._turns_fd, fcntl.LOCK_UN)
        self._leave_lane()  # after the turn: a writer waiting for the turn gets it before the lane's next one

    def _leave_lane(self) -> None:
        if self._lane_held and self._lane_fd is not None:
            self._lane_held = False
            fcntl.flock(self._lane_fd, fcntl.LOCK_UN)
