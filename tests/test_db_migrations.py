"""The Alembic migrations build, on MariaDB and on SQLite, exactly the schema the code declares."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tasks import db


@pytest.fixture(params=["mariadb", "sqlite"])
def url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    """An empty database: a scratch MariaDB database beside the test one, or a SQLite file not yet made."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'new' / 'platform.db'}"
    server = db.create_engine(database_url)
    with server.begin() as connection:
        connection.execute(sa.text("DROP DATABASE IF EXISTS platform_migrations"))
        connection.execute(sa.text("CREATE DATABASE platform_migrations"))
    server.dispose()
    return sa.make_url(database_url).set(database="platform_migrations").render_as_string(hide_password=False)


def differences(url: str) -> list:
    engine = db.create_engine(url)
    with engine.connect() as connection:
        found = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), db.metadata)
    engine.dispose()
    return found


def tables(url: str) -> set[str]:
    engine = db.create_engine(url)
    names = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_upgrade_builds_the_declared_schema_and_downgrade_removes_it(url: str):
    db.upgrade(url)
    assert {"batch_items", "batch_runs", "alembic_version"} <= tables(url)
    assert differences(url) == []
    db.upgrade(url)  # again: nothing to do
    db.downgrade(url)
    assert tables(url) <= {"alembic_version"}
    db.upgrade(url)
    assert differences(url) == []


def test_the_command_line_upgrades_the_configured_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    assert db.main(["upgrade"]) == 0
    assert "batch_items" in tables(url)
    assert db.main(["sideways"]) == 2
