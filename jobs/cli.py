"""The ``jobs`` command."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

__all__ = ["ExplainedErrorsGroup", "main"]


class ExplainedErrorsGroup(click.Group):
    """A bad setting, or Redis or the database out of reach, ends the command with a message that says
    which, why and the fix (passwords hidden), not with a traceback. The scheduler's CLI uses it too."""

    def invoke(self, ctx: click.Context) -> object:
        from resources.connections import explain_connection_errors
        from resources.errors import ConfigurationError

        try:
            with explain_connection_errors():
                return super().invoke(ctx)
        except ConfigurationError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=ExplainedErrorsGroup)
def main() -> None:
    """Reliable cloud operations on Dramatiq: executors, workers and their state."""
    from resources.logs import configure_logging

    configure_logging()


@main.command()
@click.option(
    "--instances",
    default=12,
    show_default=True,
    type=click.IntRange(1, 500),
    help="Instances to provision (each with one or two volumes).",
)
@click.option(
    "--tenants",
    default=3,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Tenants (service settings) to spread them over.",
)
@click.option(
    "--failure-rate",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Chance that each simulated cloud call kind fails for a given resource.",
)
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the failure injection.")
@click.option("--json", "json_output", is_flag=True, help="Print a machine-readable summary only.")
def demo(instances: int, tenants: int, failure_rate: float, seed: int, json_output: bool) -> None:
    """Provision, resize and delete instances with volumes through real workers on a simulated cloud.

    Without REDIS_URL it starts a private Redis and stops it at the end; without DATABASE_URL it keeps
    its state in a SQLite file under .jobs-data/. Exits 0 iff every operation ended as expected.
    """
    from .demo import DemoOptions, run_demo

    console = Console(stderr=json_output)
    summary = run_demo(DemoOptions(instances, tenants, failure_rate, seed, json_output), console)
    if json_output:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(console, summary)
    sys.exit(0 if summary["unexpected"] == 0 else 1)


def _print_summary(console: Console, summary: dict) -> None:
    operations = Table(title="Operations", title_justify="left")
    for column in ("executor", "succeeded", "failed", "running"):
        operations.add_column(column, justify="left" if column == "executor" else "right")
    for executor, counts in summary["operations"].items():
        operations.add_row(executor, *(str(counts.get(c, 0)) for c in ("succeeded", "failed", "running")))
    console.print(operations)
    if summary["failures"]:
        failures = Table(title="Failed operations (injected by the simulated cloud)", title_justify="left")
        for column in ("executor", "resource", "error"):
            failures.add_column(column)
        for failure in summary["failures"]:
            failures.add_row(failure["executor"], failure["resource"], failure["error"])
        console.print(failures)
    resources = ", ".join(f"{state}: {count}" for state, count in sorted(summary["resources"].items()))
    console.print(f"Resources at the end: {resources}")
    style = "green" if summary["unexpected"] == 0 else "bold red"
    console.print(f"[{style}]Unexpected outcomes: {summary['unexpected']}[/] — {summary['duration_s']} s")
    for item in summary["unexpected_operations"]:
        console.print(f"  {item}")


@main.command()
def migrate() -> None:
    """Upgrade the database schema to the newest migration (the Procfile's release step)."""
    from resources.config import get_settings
    from resources.db import migrate as migrate_database
    from resources.urls import redact_url

    revision = migrate_database()
    click.echo(f"database at revision {revision} on {redact_url(get_settings().database_url)}")


@main.command()
@click.option("--procfile", metavar="PATH", help="The Procfile to run (default: ./Procfile, else the project's).")
@click.option(
    "--only",
    metavar="NAMES",
    multiple=True,
    help="Comma-separated processes to start (release still runs first unless skipped).",
)
@click.option("--skip", metavar="NAMES", multiple=True, help="Comma-separated processes not to run.")
@click.option(
    "--stop-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.0, 3600.0),
    help="Seconds the processes get to stop after SIGTERM before they are killed.",
)
def dev(procfile: str | None, only: tuple[str, ...], skip: tuple[str, ...], stop_timeout: float) -> None:
    """Run every Procfile process here, logs interleaved, until Ctrl-C (or until one exits).

    Release runs first, to completion. Without REDIS_URL it starts a private Redis for the session;
    without DATABASE_URL the processes share the SQLite file under .jobs-data/.
    """
    from pathlib import Path

    from .dev import run_dev

    sys.exit(run_dev(Path(procfile) if procfile else None, only, skip, stop_timeout))


@main.group()
def throttle() -> None:
    """Look at and adjust the per-scope concurrency throttle."""


def _throttle_store():  # type: ignore[no-untyped-def]
    from middleware import Throttle

    return Throttle().store


@throttle.command("explain")
@click.argument("scope", required=False)
@click.option("--waiters", default=20, show_default=True, type=click.IntRange(0, 10_000), help="Waiters to list.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
def throttle_explain(scope: str | None, waiters: int, json_output: bool) -> None:
    """Limit, holders (operation, since, lease expiry) and waiters of SCOPE; without SCOPE, list scopes."""
    store = _throttle_store()
    if scope is None:
        explanations = [store.explain(s, max_waiters=0) for s in store.scopes()]
        if json_output:
            click.echo(json.dumps([e.as_dict() for e in explanations], indent=2))
            return
        table = Table(title="Throttle scopes", title_justify="left")
        for column in ("scope", "limit", "holding", "waiting"):
            table.add_column(column, justify="left" if column == "scope" else "right")
        for e in explanations:
            table.add_row(e.scope, str(e.limit), str(len(e.holders)), str(e.waiting))
        Console().print(table)
        return
    explanation = store.explain(scope, max_waiters=max(waiters, 1))
    if json_output:
        click.echo(json.dumps(explanation.as_dict(), indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{scope}[/]: limit {explanation.limit}, {len(explanation.holders)} holding, "
        f"{explanation.waiting} waiting"
    )
    holders = Table(title="Holders", title_justify="left")
    for column in ("operation", "state", "grant", "since (ms)", "lease expires (ms)"):
        holders.add_column(column)
    for h in explanation.holders:
        expiry = "while its next step is queued" if h.lease_expires_ms is None else str(h.lease_expires_ms)
        holders.add_row(h.operation_id, h.state, str(h.fence), str(h.since_ms), expiry)
    console.print(holders)
    line = Table(title="Waiters, first in line first", title_justify="left")
    for column in ("position", "operation", "waiting since (ms)"):
        line.add_column(column)
    for w in explanation.waiters[:waiters]:
        line.add_row(str(w.position), w.operation_id, str(w.waiting_since_ms))
    console.print(line)


@throttle.command("set-limit")
@click.argument("scope")
@click.argument("limit", type=int)
def throttle_set_limit(scope: str, limit: int) -> None:
    """Set SCOPE's limit now: raising it admits waiters at once, lowering it interrupts nobody."""
    from middleware import ThrottleScope, find_throttle
    from resources.errors import JobsError

    from .broker import broker

    try:
        wanted = ThrottleScope(scope, limit)
    except JobsError as error:
        raise click.ClickException(str(error)) from None
    throttle_middleware = find_throttle(broker)
    assert throttle_middleware is not None
    handoffs = throttle_middleware.store.set_limit(wanted)
    throttle_middleware.send(broker, handoffs)
    click.echo(f"{scope}: limit {limit}; {len(handoffs)} waiting operation(s) admitted")


# -- status, explain and dead letters -------------------------------------------------------------------
if TYPE_CHECKING:
    import dramatiq

    from .dead_letters import DeadLetterListing, DeadLetters, Requeued
    from .rabbitmq_dead_letters import RabbitmqDeadLetters
    from .status import SystemStatus


def _current_broker() -> dramatiq.Broker:
    import dramatiq

    from . import broker as _configured  # noqa: F401  (builds the project's broker and makes it current)

    return dramatiq.get_broker()


@main.command()
@click.option(
    "--oldest",
    default=10,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Operations in flight to list, the longest-running first.",
)
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object.")
def status(oldest: int, json_output: bool) -> None:
    """Resources by type and state, operations in flight, each queue's counts, the throttle's scopes and
    the scheduler's leader and periodic jobs."""
    from .status import gather_status

    report = gather_status(broker=_current_broker(), store=_throttle_store(), oldest=oldest)
    if json_output:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_status(Console(), report)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _print_status(console: Console, report: SystemStatus) -> None:
    states = sorted({state for counts in report.resources.values() for state in counts})
    resources = Table(title="Resources", title_justify="left")
    resources.add_column("type")
    for state in states:
        resources.add_column(state, justify="right")
    for resource_type, counts in report.resources.items():
        resources.add_row(resource_type, *(str(counts.get(state, "")) for state in states))
    console.print(resources)

    in_flight = report.operations_in_flight
    operations = Table(
        title=f"Operations in flight: {in_flight.count} (the {len(in_flight.oldest)} oldest)", title_justify="left"
    )
    # Folded, not clipped: ids are what a reader copies into the next command.
    for column in ("operation", "executor", "resource", "started", "age"):
        operations.add_column(column, justify="right" if column == "age" else "left", overflow="fold")
    for op in in_flight.oldest:
        started = op.started.isoformat(timespec="seconds")
        operations.add_row(op.id, op.executor, op.resource_ref, started, _age(op.age_s))
    console.print(operations)

    queues = Table(title="Queues", title_justify="left")
    for column in ("queue", "ready", "delayed", "in progress", "dead-lettered"):
        queues.add_column(column, justify="left" if column == "queue" else "right")
    for name, counts in report.queues.items():
        dead = f"[bold red]{counts.dead_lettered}[/]" if counts.dead_lettered else "0"
        progress = "-" if counts.in_progress is None else str(counts.in_progress)
        queues.add_row(name, str(counts.ready), str(counts.delayed), progress, dead)
    console.print(queues)

    scopes = Table(title="Throttle scopes", title_justify="left")
    for column in ("scope", "limit", "holding", "waiting", "oldest wait"):
        scopes.add_column(column, justify="left" if column == "scope" else "right", overflow="fold")
    for scope in report.throttle:
        limit = "-" if scope.limit is None else str(scope.limit)
        scopes.add_row(scope.scope, limit, str(scope.holders), str(scope.waiters), _age(scope.oldest_wait_s))
    console.print(scopes)

    scheduler = report.scheduler
    if scheduler is None:
        console.print("Scheduler: [dim]not installed[/]")
        return
    if scheduler.leader is None:
        console.print("Scheduler: [bold yellow]no leader[/] (no `python -m scheduler run` holds the lease)")
    else:
        console.print(f"Scheduler: leader {scheduler.leader} (lease {scheduler.lease_expires_in_s} s left)")
    jobs = Table(title="Periodic jobs", title_justify="left")
    for column in ("job", "schedule", "last run", "next run"):
        jobs.add_column(column)
    for job in scheduler.jobs:
        last = "never" if job.last_run is None else job.last_run.isoformat(timespec="seconds")
        jobs.add_row(job.name, job.cron, last, job.next_run.isoformat(timespec="seconds"))
    console.print(jobs)


# One scope's holders and waiters: the very command `jobs throttle explain`, at the top level too.
main.add_command(throttle_explain, name="explain")


def _dead_letters() -> DeadLetters | RabbitmqDeadLetters:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    from resources.errors import JobsError

    from .dead_letters import DeadLetters
    from .rabbitmq_dead_letters import RabbitmqDeadLetters

    broker = _current_broker()
    if isinstance(broker, RabbitmqBroker):
        return RabbitmqDeadLetters(broker)
    try:
        return DeadLetters(broker)
    except JobsError as error:
        raise click.ClickException(str(error)) from None


REQUEUE_NOTE = (
    "A requeued step of an operation that has ended (failed or cancelled) is skipped by the worker: "
    "requeueing does not resume an operation; run the operation again instead."
)


@main.group("dead-letters", invoke_without_command=True)
@click.option("--queue", help="Only this queue's dead letters.")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(0, 10_000),
    help="Messages to list, the most recently dead-lettered first.",
)
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object.")
@click.pass_context
def dead_letters(ctx: click.Context, queue: str | None, limit: int, json_output: bool) -> None:
    """List the messages that failed for good (kept 7 days), with their error; `requeue` puts them back.

    The error is the one their operation recorded, or the reason a body is unreadable, or the error of an
    earlier attempt; Dramatiq keeps none for a message that failed on its first attempt.
    """
    if ctx.invoked_subcommand is not None:
        # `dead-letters --queue Q --json requeue ...` means the same as giving them to `requeue`.
        ctx.obj = {"queue": queue, "json": json_output}
        return
    from resources.errors import JobsError

    try:
        listing = _dead_letters().listing(queue, limit=limit)
    except JobsError as error:
        raise click.ClickException(str(error)) from None
    if json_output:
        click.echo(json.dumps(listing.as_dict(), indent=2))
    else:
        _print_dead_letters(Console(), listing)


def _print_dead_letters(console: Console, listing: DeadLetterListing) -> None:
    total = sum(listing.counts.values())
    per_queue = ", ".join(f"{name}: {count}" for name, count in listing.counts.items())
    table = Table(
        title=f"Dead letters: {total} ({per_queue}); the {len(listing.items)} most recent", title_justify="left"
    )
    # The id unwrapped: it is what `requeue` takes.
    table.add_column("id", no_wrap=True)
    for column in ("queue", "dead-lettered", "actor", "operation", "error"):
        table.add_column(column, overflow="fold", ratio=3 if column == "error" else None)
    for item in listing.items:
        operation = "-" if item.operation_id is None else f"{item.operation_id} ({item.operation_status or 'gone'})"
        age = item.as_dict()["age_s"]
        table.add_row(item.id, item.queue, f"{_age(age)} ago", item.actor or "?", operation, item.error)
    console.print(table)
    if listing.items:
        console.print("Requeue with `python -m jobs dead-letters requeue ID...` (or `--all`). " + REQUEUE_NOTE)


@dead_letters.command("requeue")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "requeue_all", is_flag=True, help="Requeue every dead letter (of --queue, else of all).")
@click.option("--queue", help="Only dead letters of this queue.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object.")
@click.pass_context
def dead_letters_requeue(
    ctx: click.Context, message_ids: tuple[str, ...], requeue_all: bool, queue: str | None, json_output: bool
) -> None:
    """Put MESSAGE_IDs (or --all) back on their queue, with their retry count and traceback cleared.

    Each move is atomic. Exits 1 unless every message was requeued; an unknown id requeues nothing.
    A requeued step of an operation that has ended is skipped by the worker: it does not resume the
    operation.
    """
    outer = ctx.obj or {}
    queue = queue or outer.get("queue")
    json_output = json_output or bool(outer.get("json"))
    if bool(message_ids) == requeue_all:
        raise click.UsageError("name the MESSAGE_IDs to requeue, or pass --all (not both)")
    from resources.errors import JobsError

    from .plugins import load_actor_modules

    load_actor_modules()  # every actor declared: de-duplication reads their options

    store = _dead_letters()
    try:
        results = store.requeue_all(queue) if requeue_all else store.requeue(list(message_ids), queue)
    except JobsError as error:
        raise click.ClickException(str(error)) from None
    requeued = sum(1 for r in results if r.outcome == "requeued")
    if json_output:
        click.echo(json.dumps({"requeued": requeued, "results": [r.as_dict() for r in results]}, indent=2))
    else:
        _print_requeued(Console(), results, requeued)
    sys.exit(0 if requeued == len(results) else 1)


def _print_requeued(console: Console, results: list[Requeued], requeued: int) -> None:
    table = Table(title=f"Requeued {requeued} of {len(results)}", title_justify="left")
    for column in ("id", "queue", "outcome", "what next"):
        table.add_column(column, overflow="fold")
    for result in results:
        style = "green" if result.outcome == "requeued" else "bold red"
        table.add_row(result.id, result.queue, f"[{style}]{result.outcome}[/]", result.detail)
    console.print(table)
