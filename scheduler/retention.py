"""Retention: ended operations are deleted, with their step records, once their end is older than
``JOBS_OPERATION_RETENTION_DAYS`` (30 by default; ``JOBS_OPERATION_RETENTION=off`` keeps them forever).

Every executor call writes an operation row and a row per completed step, so without this the history grows
by the day. Celery bounds its result backend the same way (``result_expires``, cleaned by its
``celery.backend_cleanup`` periodic task), after a day; an operation is what an operator reads to learn why a
resource failed (its plan, error and traceback), so it is kept longer. A running operation is never deleted,
whatever its age, and a resource keeps its own state and error: only the operations' history goes.

Rows go in batches, oldest first, each batch its own short transaction: a first run over years of history
holds no lock for long, and a run stopped by its time limit leaves the rest to the next one.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from resources.config import get_settings
from resources.db import session_scope
from resources.metrics import operations_pruned
from resources.models import Operation, OperationStatus, StepDone, utcnow

from .background import periodic_job

__all__ = ["PRUNE_BATCH", "prune_ended_operations", "prune_operations"]

logger = logging.getLogger(__name__)

#: Operations deleted per transaction.
PRUNE_BATCH = 500


def prune_ended_operations(older_than: timedelta, *, now: datetime | None = None, batch: int = PRUNE_BATCH) -> int:
    """Delete the operations that ended before ``now - older_than``, with their step records, ``batch`` at a
    time, oldest first. Returns how many were deleted."""
    cutoff = (now or utcnow()) - older_than
    ended_before_cutoff = (
        select(Operation.id)
        .where(Operation.finished_at < cutoff, Operation.status != OperationStatus.RUNNING)
        .order_by(Operation.finished_at)
        .limit(batch)
    )
    pruned = 0
    while True:
        with session_scope() as session:
            ids = list(session.scalars(ended_before_cutoff))
            if ids:
                # The step records first, by statement: not left to the foreign key's cascade, which a SQLite
                # connection without PRAGMA foreign_keys would not apply.
                session.execute(delete(StepDone).where(StepDone.operation_id.in_(ids)))
                session.execute(delete(Operation).where(Operation.id.in_(ids)))
        pruned += len(ids)
        if len(ids) < batch:
            return pruned


@periodic_job("30 * * * *", env="JOBS_RETENTION_SCHEDULE", max_retries=0, time_limit=600_000)
def prune_operations() -> None:
    """Delete ended operations older than the retention period, with their step records."""
    days = get_settings().operation_retention_days
    if days <= 0:
        return  # JOBS_OPERATION_RETENTION=off: the history is kept
    pruned = prune_ended_operations(timedelta(days=days))
    operations_pruned(pruned)
    logger.info("retention: %d operation(s) that ended over %g day(s) ago deleted", pruned, days)
