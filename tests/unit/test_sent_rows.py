"""The outbox rows a process sent itself are deleted in batches, from a thread of its own."""

from __future__ import annotations

import logging

import pytest
from dramatiq import Message
from sqlalchemy import func, select

import middleware.sent_rows
from middleware.outbox import stage
from middleware.progress import Outgoing
from middleware.sent_rows import SentRows
from resources.db import session_scope
from resources.models import OutboxMessage
from tests.fixtures import wait_for


class RecordingSentRows(SentRows):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.fail = fail

    def _delete(self, row_ids: list[str]) -> None:  # type: ignore[override]
        self.batches.append(list(row_ids))
        if self.fail:
            raise ConnectionError("the database went away")
        SentRows._delete(row_ids)


def staged(count: int) -> list[str]:
    with session_scope() as session:
        ids = [stage(session, f"op-{n}", [Outgoing(Message("default", "x", (n,), {}, {}))]) for n in range(count)]
    return [row_id for row_id in ids if row_id is not None]


def rows_left() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


@pytest.fixture
def long_linger(monkeypatch):
    """A batch waits for more rows until a flush, however slow the machine."""
    monkeypatch.setattr(middleware.sent_rows, "LINGER_S", 600)


def test_rows_sent_meanwhile_are_deleted_in_one_statement(database, long_linger):
    # Given three rows sent one after another
    sent = RecordingSentRows()
    ids = staged(3)
    for row_id in ids:
        sent.add(row_id)

    # When the process flushes them
    assert sent.flush()

    # Then one delete took all three, and they are gone
    assert sent.batches == [ids]
    assert rows_left() == 0


def test_a_failed_delete_is_logged_and_leaves_the_rows_to_the_relay(database, long_linger, caplog):
    # Given a database that fails the delete
    sent = RecordingSentRows(fail=True)
    ids = staged(2)

    # When the rows are flushed
    with caplog.at_level(logging.WARNING, logger="middleware.sent_rows"):
        for row_id in ids:
            sent.add(row_id)
        assert sent.flush()

    # Then the rows are still there for the relay, and the warning says so
    assert rows_left() == 2
    assert "could not delete 2 sent outbox row(s) (ConnectionError: the database went away)" in caplog.text
    assert "the outbox relay deletes them" in caplog.text


class CountedCondition:
    """A ``threading.Condition`` that counts the wake-ups sent through it."""

    def __init__(self, condition) -> None:
        self._condition = condition
        self.wake_ups = 0

    def notify_all(self) -> None:
        self.wake_ups += 1
        self._condition.notify_all()

    def __getattr__(self, name):
        return getattr(self._condition, name)

    def __enter__(self):
        return self._condition.__enter__()

    def __exit__(self, *exc):
        return self._condition.__exit__(*exc)


def test_rows_added_while_a_batch_lingers_do_not_wake_the_deleting_thread(database, long_linger):
    # Given the deleting thread lingering over a first row
    sent = RecordingSentRows()
    counted = CountedCondition(sent._changed)
    sent._changed = counted  # type: ignore[assignment]
    ids = staged(20)
    sent.add(ids[0])
    assert counted.wake_ups == 1

    # When more rows are added meanwhile
    for row_id in ids[1:]:
        sent.add(row_id)

    # Then none of them woke it, and a flush still deletes them all in one statement
    assert counted.wake_ups == 1
    assert sent.flush()
    assert sent.batches == [ids]
    assert rows_left() == 0


def test_a_full_batch_is_deleted_without_waiting_for_the_linger(database, long_linger, monkeypatch):
    # Given batches of three rows, and a linger longer than any test
    monkeypatch.setattr(middleware.sent_rows, "BATCH", 3)
    sent = RecordingSentRows()
    ids = staged(3)

    # When a third row fills the batch, it is deleted with no flush
    for row_id in ids:
        sent.add(row_id)
    wait_for(lambda: rows_left() == 0, timeout_s=30)
    assert sent.batches == [ids]
