"""Run a callback after the session's transaction commits; drop it if that transaction rolls back.

Executors use this to send their messages only once the state change that goes with them is visible
to workers (Waldur publishes inside the open transaction and hides the race behind a 2 s countdown).
A callback registered inside a savepoint is dropped when that savepoint rolls back.
SQLAlchemy has no per-transaction "on commit" list (Django's ``transaction.on_commit``), hence this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["on_commit"]

logger = logging.getLogger(__name__)

_KEY = "after_commit_callbacks"
Callback = Callable[[], None]


def _pending(session: Session) -> list[tuple[SessionTransaction, Callback]]:
    return session.info.setdefault(_KEY, [])


def on_commit(session: Session, callback: Callback) -> None:
    """Call ``callback()`` after the session's outermost transaction commits.

    The session must be in a transaction (SQLAlchemy 2 sessions begin one on first use).
    """
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        raise RuntimeError("on_commit needs a session inside a transaction; call it after session.begin()")
    _pending(session).append((transaction, callback))


def _descends_from(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # SQLAlchemy fires this on a savepoint's release too; only the outermost commit counts
    callbacks = session.info.pop(_KEY, [])
    errors: list[Exception] = []
    for _transaction, callback in callbacks:
        try:
            callback()
        except Exception as error:  # one failed send must not stop the others
            logger.exception("after-commit callback %r failed", callback)
            errors.append(error)
    if errors:
        raise errors[0]


@event.listens_for(Session, "after_soft_rollback")
def _drop_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    callbacks: list[tuple[SessionTransaction, Callback]] = session.info.get(_KEY, [])
    kept = [(t, c) for t, c in callbacks if not _descends_from(t, previous_transaction)]
    if len(kept) != len(callbacks):
        logger.info("transaction rolled back: %d after-commit callback(s) dropped", len(callbacks) - len(kept))
    session.info[_KEY] = kept
