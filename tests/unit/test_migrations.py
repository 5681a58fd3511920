"""The Alembic migrations build exactly the models' schema, adopt databases that ``create_all`` made, and
run from ``jobs migrate``; on SQLite, and on PostgreSQL when DATABASE_URL points at one."""

from __future__ import annotations

import os
import secrets
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, inspect, select, text
from sqlalchemy.engine import make_url

from resources import migrations
from resources.config import normalise_database_url
from resources.db import create_schema, get_engine, migrate
from resources.errors import ConfigurationError
from resources.migrations import INITIAL_REVISION, INITIAL_TABLES, MIGRATIONS_DIR, alembic_config
from resources.models import Base, Operation, ServiceSettings, StepDone

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _postgres_url() -> str | None:
    url = os.environ.get("DATABASE_URL", "")
    return url if url.startswith(("postgresql", "postgres://")) else None


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'migrations.sqlite3'}"


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A database of its own on DATABASE_URL's server, dropped at the end: other runs share DATABASE_URL's."""
    given = _postgres_url()
    if given is None:
        pytest.skip("DATABASE_URL is not a PostgreSQL URL")
    server = make_url(normalise_database_url(given))
    name = f"jobs_migrations_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")  # CREATE/DROP DATABASE refuse a transaction
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = server.set(database=name).render_as_string(hide_password=False)
        try:
            yield url
        finally:
            get_engine(url).dispose()
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def _differences(url: str, metadata: MetaData = Base.metadata) -> list[Any]:
    """What autogenerate would put in a new migration: how ``metadata`` differs from the database."""
    with get_engine(url).connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), metadata)


def _revision(url: str) -> str | None:
    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _tables(url: str) -> set[str]:
    with get_engine(url).connect() as connection:
        return set(inspect(connection).get_table_names())


def test_upgrade_builds_exactly_the_models_schema(database_url: str) -> None:
    assert migrate(database_url) == HEAD
    assert _revision(database_url) == HEAD
    assert _tables(database_url) == {*Base.metadata.tables, "alembic_version"}
    assert _differences(database_url) == []


def test_the_comparison_sees_what_the_migrations_lack(sqlite_url: str) -> None:
    migrate(sqlite_url)
    models = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(models)
    models.tables["outbox"].append_column(Column("priority", Integer, nullable=True))
    Table("audit_log", models, Column("id", Integer, primary_key=True), Column("entry", String(200)))

    found = {(diff[0], diff[-1].name) for diff in _differences(sqlite_url, models)}

    assert found == {("add_table", "audit_log"), ("add_column", "priority")}


def test_initial_tables_are_those_of_the_initial_migration(sqlite_url: str) -> None:
    # migrate() recognises a create_all database by these names; they must stay 0001_initial's.
    command.upgrade(alembic_config(sqlite_url), INITIAL_REVISION)
    assert _tables(sqlite_url) == {*INITIAL_TABLES, "alembic_version"}


def test_a_database_made_by_create_all_is_adopted_with_its_rows(database_url: str) -> None:
    create_schema(database_url)
    with get_engine(database_url).begin() as connection:
        connection.execute(insert(ServiceSettings).values(uuid="a" * 32, name="kept", backend="simulated", options={}))
    assert _revision(database_url) is None

    assert migrate(database_url) == HEAD

    with get_engine(database_url).connect() as connection:
        assert connection.execute(select(ServiceSettings.name)).scalars().all() == ["kept"]
    assert _differences(database_url) == []
    assert migrate(database_url) == HEAD  # and again: nothing left to do


def test_a_database_with_only_some_of_the_tables_is_refused(sqlite_url: str) -> None:
    Base.metadata.create_all(get_engine(sqlite_url), tables=[ServiceSettings.__table__])  # type: ignore[list-item]

    with pytest.raises(ConfigurationError, match=r"service_settings.*lacks instances, operation_steps_done"):
        migrate(sqlite_url)
    assert _tables(sqlite_url) == {"service_settings"}


def test_downgrade_to_base_then_upgrade_to_head(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "head")

    command.downgrade(config, "base")
    assert _tables(database_url) == {"alembic_version"}
    assert _revision(database_url) is None

    command.upgrade(config, "head")
    assert _revision(database_url) == HEAD
    assert _differences(database_url) == []


def test_jobs_migrate_prints_the_revision(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.cli import main

    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    result = CliRunner().invoke(main, ["migrate"])

    assert result.exit_code == 0, result.output
    assert result.output == f"database at revision {HEAD} on {sqlite_url}\n"
    assert _revision(sqlite_url) == HEAD


def test_jobs_migrate_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    import resources.db
    from jobs.cli import main

    monkeypatch.setenv("DATABASE_URL", "postgresql://user:secret@db.example:5432/jobs")
    monkeypatch.setattr(resources.db, "migrate", lambda url=None: "0001_initial")  # no server needed to print
    result = CliRunner().invoke(main, ["migrate"])

    assert result.exit_code == 0, result.output
    assert result.output == "database at revision 0001_initial on postgresql+psycopg://user:***@db.example:5432/jobs\n"


def test_a_percent_encoded_password_reaches_alembic_unchanged() -> None:
    url = "postgresql+psycopg://user:p%40ss%25word@db.example:5432/jobs"
    assert alembic_config(url).get_main_option("sqlalchemy.url") == url


def _with_test_revision(monkeypatch: pytest.MonkeyPatch, directory: Path, upgrade: str) -> str:
    """Make migrate() see one more revision after the real ones, whose upgrade() runs ``upgrade``."""
    revision = "9999_test_only"
    directory.mkdir()
    body = textwrap.indent(textwrap.dedent(upgrade).strip(), "    ")
    (directory / f"{revision}.py").write_text(
        f"import sqlalchemy as sa\nfrom alembic import op\n\nrevision = {revision!r}\ndown_revision = {HEAD!r}\n"
        f"branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n{body}\n\n\ndef downgrade():\n    pass\n"
    )
    real_config = migrations.alembic_config

    def config_with_test_revision(url: str | None = None) -> Config:
        config = real_config(url)
        config.set_main_option("version_locations", f"{MIGRATIONS_DIR / 'versions'}{os.pathsep}{directory}")
        return config

    monkeypatch.setattr(migrations, "alembic_config", config_with_test_revision)
    return revision


def test_a_migration_that_fails_leaves_the_schema_as_it_was(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(database_url)
    _with_test_revision(
        monkeypatch,
        tmp_path / "versions",
        """
        op.add_column("outbox", sa.Column("attempts", sa.Integer))
        op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
        raise RuntimeError("this migration fails halfway")
        """,
    )

    with pytest.raises(RuntimeError, match="fails halfway"):
        migrate(database_url)

    assert _revision(database_url) == HEAD
    assert "half_done" not in _tables(database_url)
    assert _differences(database_url) == []


def test_a_migration_that_copies_a_table_keeps_the_rows_referring_to_it(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite changes a table by copying it; with foreign keys enforced, dropping the original would delete
    # the steps done of every operation (ON DELETE CASCADE).
    migrate(sqlite_url)
    with get_engine(sqlite_url).begin() as connection:
        connection.execute(insert(Operation).values(id="op1", executor="test", resource_ref="instance:x", plan={}))
        connection.execute(insert(StepDone).values(operation_id="op1", path="0"))
    revision = _with_test_revision(
        monkeypatch,
        tmp_path / "versions",
        """
        with op.batch_alter_table("operations", recreate="always"):
            pass
        """,
    )

    assert migrate(sqlite_url) == revision

    with get_engine(sqlite_url).connect() as connection:
        assert connection.execute(select(StepDone.path)).scalars().all() == ["0"]
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # on again for everyone else
