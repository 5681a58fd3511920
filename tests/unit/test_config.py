"""Configuration comes from the environment, with clear errors for values that cannot work."""

from __future__ import annotations

import importlib.util

import pytest

from resources.config import get_settings, normalise_database_url, start_directory
from resources.errors import ConfigurationError


def test_defaults_for_a_new_user(monkeypatch, tmp_path):
    for name in ("REDIS_URL", "DATABASE_URL", "JOBS_POLL_INTERVAL_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path))
    settings = get_settings()
    assert settings.redis_url is None
    assert settings.database_url == f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    assert (settings.poll_interval_s, settings.poll_state_attempts, settings.poll_check_attempts) == (5.0, 1200, 600)


def test_paas_postgres_urls_get_a_driver():
    assert normalise_database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_database_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_bad_numbers_name_the_variable_and_the_fix(monkeypatch, value):
    monkeypatch.setenv("JOBS_POLL_INTERVAL_S", value)
    with pytest.raises(ConfigurationError, match=rf"JOBS_POLL_INTERVAL_S='{value}' .*set it to a positive number"):
        get_settings()


@pytest.mark.parametrize(
    "value",
    [
        "redis://user:secret@127.0.0.1:6379/0",
        "redis://:secret@127.0.0.1:6379/0",
        "rediss://user:secret@redis.example:6380/0?ssl_cert_reqs=required",
        "unix:///run/redis.sock?db=0&password=secret",
    ],
)
def test_redis_urls_with_users_passwords_and_tls_are_accepted(monkeypatch, value):
    monkeypatch.setenv("REDIS_URL", value)
    assert get_settings().redis_url == value


@pytest.mark.parametrize(
    ("value", "shown", "why"),
    [
        ("http://user:secret@x", "http://user:***@x", "has scheme 'http'"),
        ("localhost:6379", "localhost:6379", "has no scheme"),
        ("redis://user:secret@host:port/0", "redis://user:***@host:port/0", "has a port that is not a number"),
        # An unencoded '/' in the password: urllib would quote a piece of it as the port.
        ("redis://user:sec/ret@host:6379/0", "redis://user:***@host:6379/0", "has a port that is not a number"),
        ("redis://user:secret@host:6379/0?db=zero", "redis://user:***@host:6379/0?db=zero", "Invalid value for 'db'"),
        ("unix://?password=secret", "unix://?password=***", "names no socket"),
    ],
)
def test_a_bad_redis_url_names_the_variable_why_and_the_fix_without_the_password(monkeypatch, value, shown, why):
    monkeypatch.setenv("REDIS_URL", value)
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"REDIS_URL={shown!r} "), message
    assert why in message and "unix:///path/to/socket" in message
    assert "secret" not in message and "sec/" not in message


@pytest.mark.parametrize(
    ("value", "shown", "why"),
    [
        ("not a url", "not a url", "is not a database URL"),
        (
            "mongodb://user:secret@host/db",
            "mongodb://user:***@host/db",
            "'mongodb', a dialect+driver SQLAlchemy cannot load",
        ),
        ("postgresql+nodriver://user:secret@h/db", "postgresql+nodriver://user:***@h/db", "cannot load"),
        ("postgresql://user:secret@host:port/db", "postgresql://user:***@host:port/db", "port that is not a number"),
        ("postgresql+psycopg2://user:secret@h/db", "postgresql+psycopg2://user:***@h/db", "'psycopg2', which is not"),
    ],
)
def test_a_bad_database_url_names_the_variable_why_and_the_fix_without_the_password(monkeypatch, value, shown, why):
    if "psycopg2" in value and importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed here")
    monkeypatch.setenv("DATABASE_URL", value)
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"DATABASE_URL={shown!r} "), message
    assert why in message and "sqlite:///path/to/file.sqlite3" in message
    assert "secret" not in message


def test_paas_database_urls_still_get_a_driver_after_the_check(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://user:secret@db.example:5432/jobs")
    assert get_settings().database_url == "postgresql+psycopg://user:secret@db.example:5432/jobs"


def test_kept_settings_follow_the_environment_and_a_relative_data_directory_stays_put(monkeypatch, tmp_path):
    # Given settings read once, with the data directory relative
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("JOBS_DATA_DIR", "data")
    first = get_settings()
    assert first.data_dir == (start_directory() / "data").resolve()
    assert get_settings() is first  # kept while nothing changed

    # When a variable changes, the next read sees it at once
    monkeypatch.setenv("JOBS_NAMESPACE", "changed")
    assert get_settings().namespace == "changed"

    # And when the process changes its working directory, the data (and the default database) stay where
    # they were: a relative data directory is relative to the directory the process started in
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JOBS_NAMESPACE", "changed again")
    assert get_settings().data_dir == first.data_dir
    assert get_settings().database_url == first.database_url
