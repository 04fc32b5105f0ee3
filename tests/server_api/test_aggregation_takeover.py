"""A worker that dies while aggregating (kill -9) leaves its round `aggregating`: another worker takes it
over as soon as the heartbeat stops, never while it beats, and exactly one version results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from server_api.app import create_app
from server_api.orm import ROUND_AGGREGATING, ModelVersion, Round, utcnow
from server_api.services import aggregation, ticker
from server_api.settings import Settings
from tests.conftest import make_settings
from tests.server_api.test_api import ADMIN_H, Api, wait_for

LEASE_S = 2.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    settings = make_settings(tmp_path, url, aggregation_lease_s=LEASE_S, tick_interval_s=0.1)
    with TestClient(create_app(settings)) as client:
        yield Api(client)


def _round_with_one_report(api: Api) -> int:
    api.task(rounds=2, policy={"target_reports": 3, "min_reports": 1})
    dev = api.device()
    a = api.assignment(dev)
    assert api.upload(dev, a, api.delta_bytes(a, 0.01)).status_code == 202
    return int(a["round_id"])


def _versions(api: Api) -> list[int]:
    with api.ctx.db.read() as s:
        return sorted(s.scalars(select(ModelVersion.version)).all())


def test_the_default_lease_recovers_in_seconds_not_minutes() -> None:
    assert Settings.model_fields["aggregation_lease_s"].default <= 30  # it was 600 s


def test_a_dead_aggregation_is_taken_over_within_the_lease(api: Api) -> None:
    round_id = _round_with_one_report(api)
    # what a worker killed mid-aggregation leaves behind: the round taken, its heartbeat silent
    dead_since = utcnow() - timedelta(seconds=3 * LEASE_S)
    with api.ctx.db.write() as s:
        s.execute(
            update(Round)
            .where(Round.id == round_id)
            .values(status=ROUND_AGGREGATING, aggregation_started_at=dead_since)
            .values(aggregation_heartbeat_at=dead_since)
        )
    # the ticker (every 0.1 s) takes it over; with the old fixed 600 s lease this waited ten minutes
    wait_for(lambda: api.c.get(f"/v1/rounds/{round_id}", headers=ADMIN_H).json()["status"] == "aggregated")
    assert _versions(api) == [1, 2]  # exactly one new version
    assert api.c.get(f"/v1/rounds/{round_id}", headers=ADMIN_H).json()["result_version"] == 2


def test_a_live_heartbeat_keeps_the_round_and_a_lost_lease_commits_nothing(api: Api) -> None:
    round_id = _round_with_one_report(api)
    now = utcnow()
    with api.ctx.db.write() as s:
        s.execute(
            update(Round)
            .where(Round.id == round_id)
            .values(status=ROUND_AGGREGATING, aggregation_started_at=now, aggregation_heartbeat_at=now)
        )
    with aggregation._Heartbeat(api.ctx, round_id, now):
        time.sleep(2 * LEASE_S)  # two leases: without the heartbeat the ticker would have taken over
        assert ticker.tick(api.ctx) == []
        with api.ctx.db.read() as s:
            rnd = s.get(Round, round_id)
            assert rnd is not None and rnd.status == ROUND_AGGREGATING and rnd.aggregation_started_at == now
    # our "worker" stops beating: the round is taken over and aggregated once; the old lease is fenced out
    wait_for(lambda: api.c.get(f"/v1/rounds/{round_id}", headers=ADMIN_H).json()["status"] == "aggregated")
    with api.ctx.db.write() as s:
        assert not aggregation.queries.renew_aggregation(s, round_id, now, utcnow())
    assert _versions(api) == [1, 2]
