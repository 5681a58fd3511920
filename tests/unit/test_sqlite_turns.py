"""SQLite writers take turns through a file lock held from BEGIN IMMEDIATE to commit, rollback or close."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from resources.sqlite_turns import TurnTakingConnection, turns_path
from tests.fixtures import wait_for


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "turns.sqlite3")
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (x INTEGER)")
    setup.commit()
    setup.close()
    yield path


def connect(path: str, timeout: float = 5.0) -> TurnTakingConnection:
    connection = sqlite3.connect(path, timeout=timeout, factory=TurnTakingConnection, check_same_thread=False)
    connection.isolation_level = None  # transactions begin when told, as SQLAlchemy's hook does
    assert isinstance(connection, TurnTakingConnection)
    return connection


def turn_is_free(path: str) -> bool:
    """Whether another process could take the turn now (a fresh descriptor, never blocking)."""
    lock_file = turns_path(path)
    assert lock_file is not None
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)  # closing drops the lock if we took it
    return True


@pytest.mark.parametrize("end", ["commit", "rollback", "close"])
def test_a_write_transaction_holds_the_turn_until_it_ends(database, end):
    # Given a connection in a write transaction
    connection = connect(database)
    connection.begin_write()
    connection.execute("INSERT INTO t VALUES (1)")

    # Then no other writer may start, until the transaction ends
    assert not turn_is_free(database)
    getattr(connection, end)()
    assert turn_is_free(database)
    connection.close()


def test_reads_take_no_turn(database):
    connection = connect(database)
    connection.execute("BEGIN")
    connection.execute("SELECT * FROM t").fetchall()
    assert turn_is_free(database)
    connection.rollback()
    connection.close()


def test_a_failed_begin_gives_the_turn_back(database):
    # Given another program (no turns) writing, and a connection that gives up at once on SQLite's lock
    other = sqlite3.connect(database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    connection = connect(database, timeout=0)

    # When its BEGIN fails, the turn is free again
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        connection.begin_write()
    assert turn_is_free(database)
    other.rollback()
    other.close()
    connection.close()


def test_a_thread_that_holds_a_turn_and_opens_a_second_write_gets_an_error_not_a_hang(database):
    # Given a thread that holds the turn on one connection, and a second connection that waits 0.2 s
    # on SQLite's lock
    holding = connect(database)
    holding.begin_write()
    second = connect(database, timeout=0.2)

    def give_up(_signal: int, _frame: object) -> None:
        raise TimeoutError("the thread waited for its own turn")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, 10)  # only a guard: without the fix the wait never ends
    try:
        # When the same thread begins a write on the second connection
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            second.begin_write()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    # Then SQLite's busy timeout reported the mistake, and the turn is still the first connection's
    assert not turn_is_free(database)
    holding.rollback()
    holding.close()
    second.close()


def lane_path(path: str) -> str:
    return f"{turns_path(path)}.background"


def blocked_on(lock_file: str) -> bool:
    """Whether some process waits for an flock on ``lock_file`` (Linux lists waiters in /proc/locks with ->)."""
    inode = os.stat(lock_file).st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return any("->" in line and line.split()[-3].endswith(f":{inode}") for line in lines)


def test_a_background_writer_holds_the_head_of_its_lane_until_its_transaction_ends(database):
    writer = connect(database)
    writer.background = True
    writer.begin_write()
    lane = os.open(lane_path(database), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(lane, fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer.commit()
        fcntl.flock(lane, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(lane)
        writer.close()
    assert turn_is_free(database)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see a waiting writer")
def test_a_foreground_writer_goes_before_a_background_writer_waiting_behind_another(database):
    # Given another background writer at the head of the lane, and a second one waiting behind it
    head = os.open(lane_path(database), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(head, fcntl.LOCK_EX)
    waiting = connect(database)
    waiting.background = True
    thread = threading.Thread(target=waiting.begin_write)
    thread.start()
    wait_for(lambda: blocked_on(lane_path(database)), timeout_s=10)

    # When a foreground writer (a web request) begins, it does not queue behind the waiting one
    foreground = connect(database)
    foreground.background = False
    foreground.begin_write()
    foreground.execute("INSERT INTO t VALUES (1)")
    foreground.commit()

    # And the background writer gets its turn once the head of the lane is done
    fcntl.flock(head, fcntl.LOCK_UN)
    os.close(head)
    thread.join(timeout=10)
    assert not thread.is_alive()
    waiting.execute("INSERT INTO t VALUES (2)")
    waiting.commit()
    assert turn_is_free(database)
    assert [row[0] for row in foreground.execute("SELECT x FROM t ORDER BY x")] == [1, 2]
    foreground.close()
    waiting.close()


def test_worker_processes_write_in_the_background_lane(monkeypatch):
    from middleware import OperationTransitions
    from resources import sqlite_turns

    monkeypatch.setattr(sqlite_turns, "_in_background_lane", False)
    OperationTransitions().after_process_boot(broker=None)  # type: ignore[arg-type]
    assert sqlite_turns._in_background_lane
