"""Retention: ended operations older than the retention period go with their step records, in batches;
running and recent ones stay; the periodic job follows JOBS_OPERATION_RETENTION(_DAYS)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from resources.config import get_settings
from resources.db import session_scope
from resources.errors import ConfigurationError
from resources.metrics import get_metrics
from resources.models import Operation, OperationStatus, StepDone, utcnow
from scheduler.retention import prune_ended_operations, prune_operations

pytestmark = pytest.mark.usefixtures("database")

DAYS_AGO_40 = timedelta(days=40)


def operation(status: str, *, ended_ago: timedelta | None, started_ago: timedelta = DAYS_AGO_40) -> str:
    """An operation of ``status`` that started ``started_ago`` and ended ``ended_ago`` (None: has not ended),
    with two step records."""
    now = utcnow()
    with session_scope() as session:
        row = Operation(
            executor="test",
            resource_ref="instance:x",
            status=status,
            plan={"root": None, "parties": []},
            created_at=now - started_ago,
            finished_at=None if ended_ago is None else now - ended_ago,
        )
        session.add(row)
        session.flush()
        session.add_all([StepDone(operation_id=row.id, path=path, done_at=row.created_at) for path in ("0", "")])
        return row.id


def kept(operation_ids: list[str]) -> set[str]:
    with session_scope() as session:
        return set(session.scalars(select(Operation.id).where(Operation.id.in_(operation_ids))))


def step_records(operation_ids: list[str]) -> int:
    with session_scope() as session:
        return session.scalar(
            select(func.count()).select_from(StepDone).where(StepDone.operation_id.in_(operation_ids))
        )


def pruned_count() -> float:
    return get_metrics().registry.get_sample_value("jobs_operations_pruned_total") or 0.0


def test_ended_operations_older_than_the_period_go_with_their_step_records():
    # Given operations that ended 40 days ago, one of each outcome
    old = [operation(status, ended_ago=DAYS_AGO_40) for status in ("succeeded", "failed", "cancelled")]
    # and one that ended yesterday, and one that started 40 days ago and still runs
    recent = operation(OperationStatus.SUCCEEDED, ended_ago=timedelta(days=1))
    running = operation(OperationStatus.RUNNING, ended_ago=None)

    # When ended operations older than 30 days are pruned
    pruned = prune_ended_operations(timedelta(days=30))

    # Then the three old ones are gone with their step records; the recent and the running ones stay whole
    assert pruned == 3
    assert kept([*old, recent, running]) == {recent, running}
    assert step_records(old) == 0
    assert step_records([recent, running]) == 4


def test_a_backlog_goes_in_batches_until_none_is_left():
    # Given five old ended operations
    old = [operation(OperationStatus.SUCCEEDED, ended_ago=DAYS_AGO_40 + timedelta(minutes=i)) for i in range(5)]

    # When they are pruned two per transaction
    pruned = prune_ended_operations(timedelta(days=30), batch=2)

    # Then every one went
    assert pruned == 5
    assert kept(old) == set()


def test_the_periodic_job_prunes_by_the_configured_period_and_counts_what_it_deleted(monkeypatch):
    # Given a retention of 10 days, and operations that ended 12 and 8 days ago
    monkeypatch.setenv("JOBS_OPERATION_RETENTION_DAYS", "10")
    older = operation(OperationStatus.FAILED, ended_ago=timedelta(days=12))
    newer = operation(OperationStatus.FAILED, ended_ago=timedelta(days=8))
    before = pruned_count()

    # When the periodic job runs
    prune_operations()

    # Then only the older one went, and the metric counted it
    assert kept([older, newer]) == {newer}
    assert pruned_count() == before + 1


def test_retention_off_keeps_every_operation(monkeypatch):
    monkeypatch.setenv("JOBS_OPERATION_RETENTION", "off")
    ancient = operation(OperationStatus.SUCCEEDED, ended_ago=timedelta(days=3650))

    prune_operations()

    assert get_settings().operation_retention_days == 0.0
    assert kept([ancient]) == {ancient}


@pytest.mark.parametrize("value", ["a month", "0", "-3"])
def test_a_bad_retention_period_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("JOBS_OPERATION_RETENTION_DAYS", value)

    with pytest.raises(ConfigurationError, match=rf"JOBS_OPERATION_RETENTION_DAYS='{value}'.*positive number"):
        get_settings()
