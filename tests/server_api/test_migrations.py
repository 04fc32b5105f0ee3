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


def _backfill(url: str) -> None:
    """0004 on a database with history: existing versions are served, and every aggregated round served
    its result (there was no gate before)."""
    from sqlalchemy import text

    db.upgrade(url, "0003")
    engine = create_engine(db.normalize_url(url))
    now = "2026-11-30 12:00:00+00:00"
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tasks (id, name, algorithm, architecture, embedding_dim, image_size, rounds,"
                    " hyperparams, policy, status, current_version, aggregated_rounds, created_at)"
                    " VALUES (1, 't', 'fedavg', 'small', 128, 64, 3, '{}', '{}', 'running', 2, 1, :now)"
                ),
                {"now": now},
            )
            for version, parent in ((1, None), (2, 1)):
                conn.execute(
                    text(
                        "INSERT INTO model_versions (version, task_id, parent_version, architecture,"
                        " blob_key, sha256, size_bytes, metrics, created_at)"
                        " VALUES (:v, 1, :p, 'small', 'k', 'k', 1, '{}', :now)"
                    ),
                    {"v": version, "p": parent, "now": now},
                )
            for rid, status, result in ((1, "aggregated", 2), (2, "open", None)):
                conn.execute(
                    text(
                        "INSERT INTO rounds (id, task_id, number, status, base_version, result_version,"
                        " target_reports, min_reports, max_assignments, assigned, reported, opened_at,"
                        " deadline, metrics) VALUES (:id, 1, :id, :status, :id, :result, 1, 1, 2, 0, 0, :now,"
                        " :now, '{}')"
                    ),
                    {"id": rid, "status": status, "result": result, "now": now},
                )
        db.upgrade(url)
        with engine.connect() as conn:
            rounds = conn.execute(text("SELECT id, served_version FROM rounds ORDER BY id")).all()
            assert [tuple(r) for r in rounds] == [(1, 2), (2, None)]
            served = conn.execute(text("SELECT served, held_back_reason FROM model_versions")).all()
            assert [(bool(s), reason) for s, reason in served] == [(True, None), (True, None)]
            assert conn.execute(text("SELECT trainable FROM tasks")).scalar() is None
    finally:
        engine.dispose()


def test_sqlite_0004_backfills_served_versions(tmp_path: Path) -> None:
    _backfill(f"sqlite:///{tmp_path / 'b.db'}")


@pytest.mark.postgres
def test_postgres_0004_backfills_served_versions(pg_url: str) -> None:
    _backfill(pg_url)
