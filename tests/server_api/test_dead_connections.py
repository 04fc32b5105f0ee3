"""Pooled PostgreSQL connections that died (server restart, a cut idle connection), without the pool's
pre-ping: the hot path's first statement replaces a dead connection and runs again; a connection that
dies later in a transaction fails it with nothing committed; idle connections are pinged on checkout.

The database server is not restarted here: its backends of the test database are terminated
(``pg_terminate_backend``), which leaves the server's pooled connections dead the same way."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from server_api import db as dbmod
from server_api.app import create_app
from server_api.db import normalize_url
from server_api.orm import Assignment, Device
from server_api.schemas import CheckinIn, RegisterIn, TrainAction
from server_api.services import devices, queries, rounds
from server_api.services.context import ServiceContext
from tests.conftest import ADMIN, SECRET, make_settings

pytestmark = pytest.mark.postgres


@pytest.fixture
def client(pg_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path, pg_url))) as c:
        yield c


@pytest.fixture
def ctx(client: TestClient) -> ServiceContext:
    return client.app.state.ctx  # type: ignore[attr-defined,no-any-return]


def _kill_backends(ctx: ServiceContext) -> int:
    """Terminate every other session on the test database (the server's pooled connections)."""
    engine = create_engine(normalize_url(ctx.db.url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    return int(killed)


def _task(client: TestClient) -> int:
    body = {
        "name": "t",
        "architecture": "tiny",
        "rounds": 2,
        "policy": {"round_timeout_s": 600, "target_reports": 5, "over_selection": 1.0, "min_reports": 1},
    }
    r = client.post("/v1/tasks", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def test_a_checkin_on_a_dead_pooled_connection_is_served_once(
    client: TestClient, ctx: ServiceContext
) -> None:
    task_id = _task(client)
    token = devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).token
    assert _kill_backends(ctx) >= 1  # the pool holds at least the registration's connection
    r = client.post("/v1/checkin", json={"task_id": task_id}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "train"
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Assignment)) == 1


def test_a_connection_that_dies_mid_transaction_fails_it_and_commits_nothing(ctx: ServiceContext) -> None:
    device = devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).device_id
    later = datetime(2031, 1, 1, tzinfo=UTC)
    with pytest.raises(ctx.db.engine.dialect.loaded_dbapi.Error), ctx.db.driver_write() as tx:
        queries.touch_device(tx, device, later, None)  # answered: no retry may follow
        _kill_backends(ctx)
        queries.checkin_view(tx, None, device)
    with ctx.db.read() as s:
        seen = s.get(Device, device)
        assert seen is not None and seen.last_seen_at != later


def test_idle_dead_connections_are_replaced_on_checkout(
    client: TestClient, ctx: ServiceContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ORM's paths have no retry: a pooled connection idle for IDLE_PING_S is pinged first."""
    task_id = _task(client)
    monkeypatch.setattr(dbmod, "IDLE_PING_S", 0.0)
    assert _kill_backends(ctx) >= 1
    r = client.get(f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    device = devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).device_id
    assert isinstance(rounds.checkin(ctx, device, CheckinIn(task_id=task_id)), TrainAction)


def test_single_statement_reads_hand_back_connections_in_transaction_mode(ctx: ServiceContext) -> None:
    """driver_read runs its statement in autocommit on PostgreSQL; the pool's other users (ORM sessions,
    write transactions) must get their connections back in transaction mode, after an error too."""
    device = devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).device_id
    with ctx.db.driver_read() as tx:
        assert queries.device_token_hash(tx, device) is not None
    with pytest.raises(RuntimeError), ctx.db.driver_read() as tx:
        queries.device_token_hash(tx, device)
        raise RuntimeError("abort")
    pool = ctx.db.engine.pool
    held = [ctx.db.engine.raw_connection() for _ in range(pool.checkedin())]  # type: ignore[attr-defined]
    try:
        assert held and all(not raw.driver_connection.autocommit for raw in held)  # type: ignore[union-attr]
    finally:
        for raw in held:
            raw.close()
