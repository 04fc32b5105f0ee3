"""Alembic environment: the URL comes from the config (set by server_api.db) or FACEFL_DATABASE_URL."""

from __future__ import annotations

import os

from sqlalchemy import text

from alembic import context
from server_api.db import create_db_engine, normalize_url
from server_api.orm import Base

config = context.config
target_metadata = Base.metadata

# An arbitrary constant: the PostgreSQL advisory lock that serializes concurrent migrators (workers).
_MIGRATION_LOCK_ID = 7_461_230_115


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        url = os.environ.get("FACEFL_DATABASE_URL", "sqlite:///facefl-data/facefl.db")
    return normalize_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_db_engine(_url())
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
            connection.commit()
        try:
            # SQLite: one transaction for the whole run (its DDL is transactional, but Alembic defaults to a
            # commit per migration there). Its BEGIN IMMEDIATE then holds the write lock from reading the
            # version to the last migration, so concurrent migrators (workers starting together) cannot both
            # see the same old version between two migrations and apply the next one twice.
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=True,
                transactional_ddl=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_ID})
                connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
