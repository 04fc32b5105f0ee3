"""The check-in and authentication hot path: prepared statements on the driver, the token-hash cache, and
the check-in's guarantees under concurrency (one assignment per device per round, never more than the
round's slots), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from server_api import security
from server_api.app import create_app
from server_api.errors import ApiError
from server_api.orm import Assignment, Device, Round
from server_api.schemas import CheckinIn, RegisterIn, TrainAction, WaitAction
from server_api.services import devices, queries, rounds
from server_api.services.context import ServiceContext
from server_api.services.token_cache import TokenHashes
from tests.conftest import ADMIN, SECRET, make_settings


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with TestClient(create_app(make_settings(tmp_path, url))) as c:
        yield c


@pytest.fixture
def ctx(client: TestClient) -> ServiceContext:
    return client.app.state.ctx  # type: ignore[attr-defined,no-any-return]


def _task(client: TestClient, **policy: Any) -> int:
    body = {"name": "t", "architecture": "tiny", "rounds": 2, "policy": {"round_timeout_s": 600, **policy}}
    r = client.post("/v1/tasks", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _register(ctx: ServiceContext) -> str:
    return devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).device_id


def _run_together(n: int, fn: Any) -> list[Any]:
    """``fn(i)`` on ``n`` threads released at once; returns results (or the exceptions raised)."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # reported by the caller's assertion
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_driver_values_read_back_identically_through_the_orm(ctx: ServiceContext) -> None:
    """Datetimes (UTC), JSON and NULLs written by prepared statements are what the ORM reads, and the
    other way round."""
    now = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    caps = {"accelerator": "npu", "num_samples": 7, "nested": [1, {"a": None}]}
    with ctx.db.driver_write() as tx:
        queries.insert_device(tx, "d1", None, "ab" * 32, caps, now)
    with ctx.db.read() as s:
        d = s.get(Device, "d1")
        assert d is not None
        assert (d.name, d.token_hash, d.capabilities, d.created_at, d.last_seen_at) == (
            None, "ab" * 32, caps, now, None,
        )  # fmt: skip
    later = now + timedelta(hours=5)
    with ctx.db.driver_write() as tx:
        # another time zone, same instant: stored and read back as UTC
        queries.touch_device(tx, "d1", later.astimezone(timezone(timedelta(hours=2))), {"accelerator": "cpu"})
        assert queries.device_token_hash(tx, "d1") == "ab" * 32
        assert queries.device_token_hash(tx, "nobody") is None
    with ctx.db.read() as s:
        d = s.get(Device, "d1")
        assert d is not None and d.last_seen_at == later and d.capabilities == {"accelerator": "cpu"}
        assert d.last_seen_at.utcoffset() == timedelta(0)


def test_a_failed_driver_transaction_writes_nothing(ctx: ServiceContext) -> None:
    with pytest.raises(RuntimeError), ctx.db.driver_write() as tx:
        queries.insert_device(tx, "d2", "x", "cd" * 32, {}, datetime.now(UTC))
        raise RuntimeError("abort")
    with ctx.db.read() as s:
        assert s.get(Device, "d2") is None


def test_concurrent_checkins_of_one_device_get_one_assignment(
    client: TestClient, ctx: ServiceContext
) -> None:
    task_id = _task(client, target_reports=5, over_selection=1.0, min_reports=1)
    device = _register(ctx)
    body = CheckinIn(task_id=task_id)
    results = _run_together(6, lambda _: rounds.checkin(ctx, device, body))
    assert all(isinstance(r, TrainAction) for r in results), results
    assert len({r.assignment.round_id for r in results}) == 1
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Assignment)) == 1
        rnd = s.scalars(select(Round)).one()
        assert rnd.assigned == 1
        stored = s.scalars(select(Assignment)).one().upload_token_hash
    # the surviving upload token is exactly one of those handed out (the last writer's)
    assert sum(security.hash_secret(r.assignment.upload_token) == stored for r in results) == 1


def test_concurrent_checkins_never_take_more_than_the_slots(client: TestClient, ctx: ServiceContext) -> None:
    task_id = _task(client, target_reports=3, over_selection=1.5, min_reports=1)  # 5 slots
    ids = [_register(ctx) for _ in range(12)]
    body = CheckinIn(task_id=task_id)
    results = _run_together(len(ids), lambda i: rounds.checkin(ctx, ids[i], body))
    trained = [r for r in results if isinstance(r, TrainAction)]
    waited = [r for r in results if isinstance(r, WaitAction)]
    assert len(trained) == 5 and len(waited) == 7, results
    assert {w.reason for w in waited} == {"round_full"}
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Assignment)) == 5
        assert s.scalars(select(Round)).one().assigned == 5


def test_checkin_without_task_id_picks_the_oldest_task_with_an_open_round(
    client: TestClient, ctx: ServiceContext
) -> None:
    first = _task(client, target_reports=1, over_selection=1.0, min_reports=1)
    second = _task(client, target_reports=1, over_selection=1.0, min_reports=1)
    a, b = _register(ctx), _register(ctx)
    got = rounds.checkin(ctx, a, CheckinIn())
    assert isinstance(got, TrainAction) and got.assignment.task_id == first
    # the first task's round is full now, but it is still the oldest task with an open round
    full = rounds.checkin(ctx, b, CheckinIn())
    assert isinstance(full, WaitAction) and full.reason == "round_full"
    assert isinstance(rounds.checkin(ctx, b, CheckinIn(task_id=second)), TrainAction)


def test_token_cache_authenticates_without_the_database_and_refuses_a_wrong_secret(
    ctx: ServiceContext,
) -> None:
    out = devices.register(ctx, RegisterIn(enrollment_secret=SECRET))
    assert ctx.device_tokens.get(out.device_id) is not None  # cached by the registration
    assert devices.authenticate_cached(ctx, out.token) == out.device_id
    forged = out.token[:-2] + ("AA" if not out.token.endswith("AA") else "BB")
    with pytest.raises(ApiError) as err:
        devices.authenticate_cached(ctx, forged)
    assert err.value.status_code == 401
    # another process (empty cache) reads the hash from the database once, then caches it
    ctx.device_tokens = TokenHashes()
    assert devices.authenticate_cached(ctx, out.token) is None
    assert devices.authenticate(ctx, out.token) == out.device_id
    assert devices.authenticate_cached(ctx, out.token) == out.device_id
    # an unknown device is refused and not cached (random ids cannot fill the cache)
    with pytest.raises(ApiError):
        devices.authenticate(ctx, "0123456789abcdef0123456789abcdef.secret")
    assert ctx.device_tokens.get("0123456789abcdef0123456789abcdef") is None
    with pytest.raises(ApiError):
        devices.authenticate(ctx, forged)


def test_token_cache_is_bounded() -> None:
    cache = TokenHashes(max_entries=3)
    for i in range(10):
        cache.put(f"d{i}", f"h{i}")
    assert len(cache) == 3
    assert [cache.get(f"d{i}") for i in (6, 7, 8, 9)] == [None, "h7", "h8", "h9"]
