"""Deletes the outbox rows a process has sent itself, in batches, from a thread of its own.

A row sent straight after its commit (``outbox.send_committed``) is marked sent in Redis, and its delete
can wait: this way a web request's ``execute()`` costs one database transaction, not two, and under load
one delete serves every row sent meanwhile. A process that exits or dies with rows not yet deleted leaves
them to the relay, which finds them marked sent and deletes them unsent.

Written by hand: this is a few lines around ``threading.Condition``, and a task queue would need a
transaction per row, the very cost this saves.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

from sqlalchemy import delete

from resources.db import session_scope
from resources.models import OutboxMessage
from resources.redis_client import settle_replies

from .outbox_claims import forget

__all__ = ["SentRows", "sent_rows"]

logger = logging.getLogger(__name__)

#: Rows one delete statement names at most.
BATCH = 500
#: How long the first row of a batch waits for others: a write transaction less per row sent meanwhile
#: (on SQLite, a turn less for the workers' writers to wait behind). A flush does not wait.
LINGER_S = 0.25


class SentRows:
    """Row ids waiting for their delete, and the thread that deletes them."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._waiting: list[str] = []
        self._deleting = 0
        self._flushing = 0
        self._changed = threading.Condition()
        self._started = False

    def add(self, row_id: str) -> None:
        with self._changed:
            self._waiting.append(row_id)
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="outbox-sent-rows", daemon=True).start()
            # Wake the thread only when it has something new to do: a first row to linger for, or a full batch.
            # A wake-up per row (one per execute()) would cost the caller's process a thread switch each time.
            if len(self._waiting) == 1 or len(self._waiting) >= BATCH:
                self._changed.notify_all()

    def forget_parent(self) -> None:
        """In a child just forked: the parent's thread did not come along, and the parent deletes its rows."""
        self._reset()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every row added so far is deleted (or its delete failed); False on timeout. Rows whose
        send's answer was still unread (``ThreadConnections.send_ahead``) are added first."""
        deadline = time.monotonic() + timeout_s
        settle_replies()
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            try:
                while self._waiting or self._deleting:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
            finally:
                self._flushing -= 1
        return True

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._waiting:
                    self._changed.wait()
                self._changed.wait_for(lambda: self._flushing or len(self._waiting) >= BATCH, timeout=LINGER_S)
                batch, self._waiting = self._waiting[:BATCH], self._waiting[BATCH:]
                self._deleting = len(batch)
            try:
                self._delete(batch)
            except Exception as error:  # the relay deletes them, once their grace period is over
                logger.warning(
                    "could not delete %d sent outbox row(s) (%s: %s); the outbox relay deletes them",
                    len(batch),
                    type(error).__name__,
                    error,
                )
            finally:
                with self._changed:
                    self._deleting = 0
                    self._changed.notify_all()

    @staticmethod
    def _delete(row_ids: list[str]) -> None:
        with session_scope() as session:
            session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(row_ids)))
        forget(row_ids)


#: The process's one queue of sent rows.
sent_rows = SentRows()
atexit.register(sent_rows.flush, 2.0)
os.register_at_fork(after_in_child=sent_rows.forget_parent)
