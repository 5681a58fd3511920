"""Passwords in connection URLs never reach output: redaction, and the CLIs facing unreachable servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from resources.config import get_settings
from resources.connections import ServiceUnreachable, explain_connection_errors
from resources.urls import redact_text, redact_url, url_secrets

#: Nothing listens on port 1: connecting is refused at once.
UNREACHABLE_REDIS = "redis://user:secret@127.0.0.1:1/0"
UNREACHABLE_POSTGRES = "postgresql://user:secret@127.0.0.1:1/db"
PROJECT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:secret@127.0.0.1:6379/0", "redis://user:***@127.0.0.1:6379/0"),
        ("redis://:secret@redis.example:6379/2", "redis://:***@redis.example:6379/2"),
        (
            "rediss://user:secret@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
            "rediss://user:***@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
        ),
        ("unix:///run/redis.sock?db=0&password=secret", "unix:///run/redis.sock?db=0&password=***"),
        ("unix://user:secret@/run/redis.sock?db=1", "unix://user:***@/run/redis.sock?db=1"),
        ("postgresql+psycopg://user:secret@db.example/jobs", "postgresql+psycopg://user:***@db.example/jobs"),
        ("postgres://user:secret@db.example:5432/jobs", "postgres://user:***@db.example:5432/jobs"),
        (
            "postgresql://user@db.example/jobs?password=secret&sslmode=require",
            "postgresql://user@db.example/jobs?password=***&sslmode=require",
        ),
        (
            "postgresql://u@h/db?sslpassword=secret;application_name=x",
            "postgresql://u@h/db?sslpassword=***;application_name=x",
        ),
        ("redis://user:s%40cret@host:6379/0", "redis://user:***@host:6379/0"),
        # Unencoded '@', '/' or '?' in the password: everything up to the last '@' is user info.
        ("redis://user:se@cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:se/cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:se?cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://u:secret@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://h:6379/0?password=secret#part", "redis://h:6379/0?password=***#part"),
        ("user:secret@host:6379", "user:***@host:6379"),
    ],
)
def test_every_form_of_password_is_hidden(url, shown):
    assert redact_url(url) == shown
    assert "secret" not in redact_url(url) and "cret" not in redact_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://user@host:6379/0",  # a user name alone is no secret
        "rediss://host:6380/0?ssl_cert_reqs=required",
        "unix:///tmp/redis.sock?db=0",
        "sqlite:////srv/data/jobs@2024.sqlite3",  # an '@' in a path is not user info
        "redis://host:6379/0?client_name=a@b",
        "sqlite://",
        "not a url",
        "",
    ],
)
def test_urls_without_a_password_are_left_as_they_are(url):
    assert redact_url(url) == url
    assert url_secrets(url) == []


def test_the_secrets_of_a_url_are_found_as_written_and_decoded():
    assert url_secrets("redis://u:p%40ss@h/0?password=two") == ["p%40ss", "p@ss", "two"]


def test_free_text_loses_the_given_urls_passwords_and_any_url_password():
    text = "auth failed for 'secret' (p@ss) via redis://other:hidden@h:1/0, see postgresql://u:secret@db/x"
    cleaned = redact_text(text, "redis://u:secret@h/0", "postgresql://u:p%40ss@db/x", None)
    assert cleaned == "auth failed for '***' (***) via redis://other:***@h:1/0, see postgresql://u:***@db/x"


def test_settings_repr_hides_both_passwords(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://user:secret@127.0.0.1:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://user:secret@127.0.0.1:5432/db")
    shown = repr(get_settings())
    assert "redis_url='redis://user:***@127.0.0.1:6379/0'" in shown
    assert "database_url='postgresql+psycopg://user:***@127.0.0.1:5432/db'" in shown
    assert "secret" not in shown


def test_a_driver_message_quoting_the_url_is_cleaned(monkeypatch):
    import redis

    monkeypatch.setenv("REDIS_URL", UNREACHABLE_REDIS)
    with pytest.raises(ServiceUnreachable) as caught, explain_connection_errors():
        raise redis.ConnectionError(f"cannot connect to {UNREACHABLE_REDIS} (password secret)")
    message = str(caught.value)
    assert message.startswith("cannot reach Redis at REDIS_URL='redis://user:***@127.0.0.1:1/0': ")
    assert "secret" not in message and caught.value.__cause__ is None


# -- the command lines against servers that are not there ------------------------------------------


def _assert_says_which_why_and_fix(output: str, variable: str, redacted: str, reason: str, fix: str) -> None:
    assert f"{variable}='{redacted}'" in output, output
    assert reason in output, output
    assert fix in output, output
    assert "secret" not in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize(
    ("cli", "args"),
    [
        ("scheduler", ["status"]),
        ("scheduler", ["run"]),
        ("jobs", ["throttle", "explain"]),
    ],
)
def test_cli_against_an_unreachable_redis_says_which_and_why(monkeypatch, stub_broker, cli, args):
    from jobs.cli import main as jobs_main
    from scheduler.cli import main as scheduler_main

    monkeypatch.setenv("REDIS_URL", UNREACHABLE_REDIS)
    result = CliRunner().invoke(scheduler_main if cli == "scheduler" else jobs_main, args)
    assert result.exit_code == 1, result.output
    _assert_says_which_why_and_fix(
        result.output,
        "REDIS_URL",
        "redis://user:***@127.0.0.1:1/0",
        "Connection refused",
        "start Redis there, or set REDIS_URL to a running one",
    )


def test_migrate_against_an_unreachable_postgresql_says_which_and_why(monkeypatch):
    from jobs.cli import main

    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_POSTGRES)
    result = CliRunner().invoke(main, ["migrate"])
    assert result.exit_code == 1, result.output
    _assert_says_which_why_and_fix(
        result.output,
        "DATABASE_URL",
        "postgresql://user:***@127.0.0.1:1/db",
        "Connection refused",
        "check that the server is running and reachable from here",
    )


@pytest.mark.parametrize(
    ("module", "args", "variable", "value", "redacted", "fix"),
    [
        ("scheduler", ["run"], "REDIS_URL", UNREACHABLE_REDIS, "redis://user:***@127.0.0.1:1/0", "start Redis there"),
        # In a process of its own: in this one the broker's throttle already holds a client of the test Redis.
        (
            "jobs",
            ["throttle", "set-limit", "some-scope", "2"],
            "REDIS_URL",
            UNREACHABLE_REDIS,
            "redis://user:***@127.0.0.1:1/0",
            "start Redis there",
        ),
        (
            "jobs",
            ["migrate"],
            "DATABASE_URL",
            UNREACHABLE_POSTGRES,
            "postgresql://user:***@127.0.0.1:1/db",
            "check that the server is running",
        ),
    ],
)
def test_the_real_commands_exit_with_one_clean_line(module, args, variable, value, redacted, fix):
    environment = {**os.environ, variable: value}
    environment.pop("JOBS_BROKER", None)  # the real broker, as in production
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    _assert_says_which_why_and_fix(done.stdout + done.stderr, variable, redacted, "Connection refused", fix)
    assert done.stderr.startswith("Error: cannot "), done.stderr
