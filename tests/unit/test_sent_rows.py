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
