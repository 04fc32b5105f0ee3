"""Alembic: upgrade head on an empty DB matches the ORM exactly; downgrade to base removes everything."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from server_api import db
from server_api.orm import Base


def _check(url: str) -> None:
    db.upgrade(url)
    engine = create_engine(db.normalize_url(url))
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert {"devices", "tasks", "rounds", "assignments", "updates", "model_versions"} <= tables
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diffs == [], f"ORM and migrations disagree: {diffs}"
        db.upgrade(url)  # idempotent at head
        db.downgrade(url, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        db.upgrade(url)  # and back up again
    finally:
        engine.dispose()


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    _check(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
def test_postgres_upgrade_downgrade(pg_url: str) -> None:
    _check(pg_url)


def _concurrent_upgrades(url: str, n: int = 4) -> None:
    """N processes migrate the same empty database at once (as N workers starting together would)."""
    import subprocess
    import sys

    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    code = "import sys; from server_api.db import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(n)
    ]
    outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "\n".join(outputs)
    head = ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()
    engine = create_engine(db.normalize_url(url))
    try:
        with engine.connect() as conn:
            assert [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))] == [head]
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_sqlite_concurrent_upgrades_do_not_race(tmp_path: Path) -> None:
    _concurrent_upgrades(f"sqlite:///{tmp_path / 'race.db'}")


@pytest.mark.postgres
def test_postgres_concurrent_upgrades_do_not_race(pg_url: str) -> None:
    _concurrent_upgrades(pg_url)
