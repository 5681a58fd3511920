"""``python -m scheduler check`` and ``status``."""

from __future__ import annotations

from click.testing import CliRunner

from scheduler.cli import main


def test_check_lists_every_periodic_job_with_its_next_ticks(stub_broker):
    result = CliRunner().invoke(main, ["check"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "pull_resources" in result.output and "janitor" in result.output
    assert "*/10 * * * *" in result.output


def test_status_shows_the_leader_and_the_last_tick_handled(stub_broker):
    from scheduler.cli import _build

    # Given a scheduler that led one round
    scheduler = _build(())
    scheduler.round()
    try:
        result = CliRunner().invoke(main, ["status"], terminal_width=200)
    finally:
        scheduler.lease.release()

    # Then status names it and shows each job's last tick handled (its first sight, not "never")
    assert result.exit_code == 0, result.output
    assert f"leader: {scheduler.lease.identity}" in result.output
    assert "never" not in result.output
