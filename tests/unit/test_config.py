"""Configuration comes from the environment, with clear errors for values that cannot work."""

from __future__ import annotations

import pytest

from resources.config import get_settings, normalise_database_url
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
