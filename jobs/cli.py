"""The ``jobs`` command."""

from __future__ import annotations

import json
import sys

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
