"""The scheduler's section of ``python -m jobs status``: who leads, and each periodic job's last and next
run. The jobs layer finds it through the ``cloud_jobs.scheduler_status`` entry point (pyproject.toml), so
that it never imports this layer above it."""

from __future__ import annotations

from datetime import UTC, datetime

from jobs.status import ScheduledJob, SchedulerStatus

from .runner import Scheduler

__all__ = ["current_status", "scheduler_status"]


def scheduler_status(scheduler: Scheduler) -> SchedulerStatus:
    """The leader, and each periodic job's last handled tick and next tick (``python -m scheduler status``)."""
    leader = scheduler.lease.holder()
    now = datetime.fromtimestamp(scheduler.clock(), UTC)
    jobs = []
    for job in scheduler.jobs:
        last = scheduler.ledger.last(job.name)
        jobs.append(
            ScheduledJob(
                job.name,
                job.schedule.expression,
                None if last is None else datetime.fromtimestamp(last, UTC),
                job.schedule.next_after(now),
            )
        )
    expires = round(scheduler.lease.remaining_s(), 1) if leader is not None else None
    return SchedulerStatus(leader, expires, jobs)


def current_status() -> SchedulerStatus:
    """The section for the scheduler of ``scheduler.app``'s periodic jobs, its lease and its ledger: what
    ``python -m scheduler status`` reads."""
    from .cli import _build

    return scheduler_status(_build(()))
