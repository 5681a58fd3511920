"""The scheduler loop: while this process leads, send each periodic job when its tick comes.

Time is Redis's clock (``TIME``), so that every scheduler process agrees on it. Each round the leader
renews its lease, then, per job, sends the latest tick that is due and after the job's last handled tick
(the ledger), and records it. Ticks missed while no scheduler ran (or during a hand-over) are coalesced:
the next leader sends the job once, for the latest missed tick, as Celery beat does. A tick whose send
fails (Redis unreachable) is not recorded and is sent on a later round.

A leader that dies after sending a tick but before recording it leaves that tick to be sent again by the
next leader; the tick's claim (``PeriodicTicks``) keeps it from running twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import dramatiq
import redis

from middleware import OPTION_TICK, DuplicateJob

from .leader import LeaderLease
from .ledger import TickLedger
from .schedules import InvalidSchedule, Schedule, schedule_for

__all__ = ["PeriodicJob", "Scheduler", "periodic_jobs", "redis_clock"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeriodicJob:
    actor: dramatiq.Actor  # type: ignore[type-arg]
    schedule: Schedule

    @property
    def name(self) -> str:
        return self.actor.actor_name


def periodic_jobs(broker: dramatiq.Broker, zone: ZoneInfo) -> list[PeriodicJob]:
    """Every actor with a ``periodic`` option, its schedule checked. All problems are reported at once."""
    jobs: list[PeriodicJob] = []
    problems: list[str] = []
    for name in sorted(broker.actors):
        actor = broker.actors[name]
        if "periodic" not in actor.options:
            continue
        try:
            jobs.append(PeriodicJob(actor, schedule_for(name, actor.options["periodic"], zone)))
        except InvalidSchedule as error:
            problems.append(str(error))
    if problems:
        raise InvalidSchedule("; ".join(problems))
    return jobs


def redis_clock(client: redis.Redis) -> Callable[[], float]:
    def now() -> float:
        seconds, microseconds = client.time()
        return seconds + microseconds / 1_000_000

    return now


def _moment(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class Scheduler:
    def __init__(
        self,
        jobs: Iterable[PeriodicJob],
        *,
        lease: LeaderLease,
        ledger: TickLedger,
        clock: Callable[[], float],
    ) -> None:
        self.jobs = list(jobs)
        self.lease = lease
        self.ledger = ledger
        self.clock = clock

    @property
    def renew_every_s(self) -> float:
        return self.lease.ttl_s / 3

    def round(self) -> float:
        """One round of the loop; returns how long to wait before the next."""
        if not self.lease.hold():
            # Follow: look again when the leader's lease would run out, to take over at once.
            return max(0.01, min(self.renew_every_s, self.lease.remaining_s() + 0.01))
        now = self.clock()
        for job in self.jobs:
            self._send_due(job, now)
        if not self.jobs:
            return self.renew_every_s
        now = self.clock()
        next_tick = min(job.schedule.next_after(_moment(now)).timestamp() for job in self.jobs)
        return max(0.0, min(self.renew_every_s, next_tick - now))

    def _send_due(self, job: PeriodicJob, now: float) -> None:
        last = self.ledger.start_from(job.name, now)
        due = job.schedule.latest_at_or_before(_moment(now))
        if due is None or due.timestamp() <= last:
            return
        if job.schedule.next_after(_moment(last)) < due:
            logger.warning("%s: ticks missed since %s; sending it once, for %s", job.name, _moment(last), due)
        tick = due.timestamp()
        try:
            message = job.actor.send_with_options(**{OPTION_TICK: int(tick), "scheduled_at": due.isoformat()})
        except DuplicateJob as duplicate:
            outcome, detail = "skipped", f"equal job {duplicate.owner} queued or running"
        else:
            if message is None:
                outcome, detail = "skipped", "equal job queued or running"
            else:
                outcome, detail = "sent", message.message_id
        self.ledger.record(job.name, tick, outcome, detail, self.lease.identity)
        logger.info("%s tick %s: %s (%s)", job.name, due.isoformat(), outcome, detail)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set, then hand the lease over at once."""
        try:
            while not stop.is_set():
                try:
                    wait = self.round()
                except redis.RedisError as error:
                    logger.warning("scheduler round failed (%s); trying again in %.1f s", error, self.renew_every_s)
                    wait = self.renew_every_s
                stop.wait(wait)
        finally:
            self.lease.release()
