"""The scheduler's command line: ``run`` (the Procfile's scheduler process), ``status``, ``check``."""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from datetime import UTC, datetime

import click
import dramatiq
from rich.console import Console
from rich.table import Table

from jobs.cli import ExplainedErrorsGroup
from middleware import find_deduplicate
from resources.config import get_settings
from resources.errors import ConfigurationError
from resources.logs import configure_logging
from resources.redis_client import get_redis

from .leader import LeaderLease
from .ledger import TickLedger
from .runner import PeriodicJob, Scheduler, periodic_jobs, redis_clock

__all__ = ["main"]

DEFAULT_MODULES = ("scheduler.app",)


def _load(modules: tuple[str, ...]) -> None:
    try:
        for module in modules or DEFAULT_MODULES:
            importlib.import_module(module)
    except ConfigurationError as error:
        raise click.ClickException(str(error)) from None


def _build(modules: tuple[str, ...]) -> Scheduler:
    """The scheduler of every periodic actor in ``modules``; a bad schedule stops here, named."""
    _load(modules)
    settings = get_settings()
    try:
        jobs = periodic_jobs(dramatiq.get_broker(), settings.zone)
    except ConfigurationError as error:
        raise click.ClickException(str(error)) from None
    client = get_redis(settings.broker_url)
    prefix = f"{settings.namespace}:scheduler"
    return Scheduler(
        jobs,
        lease=LeaderLease(client, f"{prefix}:leader", ttl_s=settings.scheduler_lease_s),
        ledger=TickLedger(client, prefix),
        clock=redis_clock(client),
    )


@click.group(cls=ExplainedErrorsGroup)
def main() -> None:
    """Periodic background jobs: one leader sends each tick once."""
    configure_logging()


@main.command()
@click.argument("modules", nargs=-1)
@click.option("-v", "--verbose", is_flag=True, help="Log every round.")
def run(modules: tuple[str, ...], verbose: bool) -> None:
    """Send the periodic jobs of MODULES (default: scheduler.app) while this process leads.

    Start as many as you like: one leads, the others take over within JOBS_SCHEDULER_LEASE_S of its
    death, and on SIGTERM the leader hands over at once."""
    configure_logging(logging.INFO, level=logging.DEBUG if verbose else None)
    scheduler = _build(modules)
    # Fail at start on a Redis that cannot be reached; the loop rides out later outages (logs, tries again).
    scheduler.lease.client.ping()
    log = logging.getLogger("scheduler")
    for job in scheduler.jobs:
        log.info("periodic job %s: %s (%s)", job.name, job.schedule.expression, _zone_of(job))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("scheduler %s started", scheduler.lease.identity)
    scheduler.run(stop)
    log.info("scheduler %s stopped", scheduler.lease.identity)


@main.command()
@click.argument("modules", nargs=-1)
def check(modules: tuple[str, ...]) -> None:
    """Check every periodic job's schedule and show its next ticks (exits 1 on a bad one)."""
    jobs = _build(modules).jobs
    table = Table("job", "schedule", "next ticks")
    moment = datetime.now(UTC)
    for job in jobs:
        ticks, at = [], moment
        for _ in range(3):
            at = job.schedule.next_after(at)
            ticks.append(at.isoformat(timespec="minutes"))
        table.add_row(job.name, job.schedule.expression, "\n".join(ticks))
    Console().print(table)


@main.command()
@click.argument("modules", nargs=-1)
def status(modules: tuple[str, ...]) -> None:
    """The leader, and per job its schedule, last tick handled and next tick."""
    import dramatiq

    scheduler = _build(modules)
    console = Console()
    holder = scheduler.lease.holder()
    console.print(f"leader: {holder or 'none'} (lease {scheduler.lease.remaining_s():.1f} s left)")
    skipped = {}
    dedup = find_deduplicate(dramatiq.get_broker())
    if dedup is not None:
        skipped = dedup.skipped()
    now = datetime.fromtimestamp(scheduler.clock(), UTC)
    table = Table("job", "schedule", "last tick handled", "next tick", "skipped (enqueue/run)")
    for job in scheduler.jobs:
        last = scheduler.ledger.last(job.name)
        table.add_row(
            job.name,
            job.schedule.expression,
            "never" if last is None else datetime.fromtimestamp(last, UTC).isoformat(timespec="seconds"),
            job.schedule.next_after(now).isoformat(timespec="seconds"),
            f"{skipped.get(f'{job.name}:enqueue', 0)}/{skipped.get(f'{job.name}:run', 0)}",
        )
    console.print(table)


def _zone_of(job: PeriodicJob) -> str:
    zone = getattr(job.schedule, "zone", None)
    return f"time zone {zone}" if zone is not None else "interval"
