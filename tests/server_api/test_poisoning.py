"""One hostile device against the default policy: the update-norm bound, the sample-weight cap, and the
guarantee that no non-finite model version is ever stored or served."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from facefl import codec
from facefl.models import build_backbone, state_to_numpy
from server_api.app import create_app
from server_api.orm import ModelVersion
from server_api.services.tasks import NORM_BOUND_FACTOR
from server_api.task_schemas import DEFAULT_MAX_SAMPLE_WEIGHT
from tests.conftest import make_settings
from tests.server_api.test_api import ADMIN_H, Api, unchanged, wait_for


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with TestClient(create_app(make_settings(tmp_path, url, max_upload_bytes=4 * 1024 * 1024))) as client:
        yield Api(client)


def _round_status(api: Api, round_id: int) -> str:
    return str(api.c.get(f"/v1/rounds/{round_id}", headers=ADMIN_H).json()["status"])


def test_default_norm_bound_derives_from_the_fresh_model_and_refuses_a_huge_update(api: Api) -> None:
    task = api.task(policy={"target_reports": 2, "min_reports": 1})
    fresh = state_to_numpy(build_backbone("small", seed=0))
    expected = NORM_BOUND_FACTOR * codec.global_norm(fresh)
    assert task["policy"]["update_norm_bound"] == pytest.approx(expected, rel=1e-3)
    honest, hostile = api.device(), api.device()
    a1, a2 = api.assignment(honest), api.assignment(hostile)
    assert api.upload(honest, a1, api.delta_bytes(a1, 0.001)).status_code == 202
    r = unchanged(api, lambda: api.upload(hostile, a2, api.delta_bytes(a2, 1e38)))
    assert r.status_code == 422 and r.json()["code"] == "norm_too_large"


def test_norm_bound_can_be_set_or_explicitly_disabled(api: Api) -> None:
    assert api.task(policy={"update_norm_bound": 3.5})["policy"]["update_norm_bound"] == 3.5
    assert api.task(policy={"update_norm_bound": "off"})["policy"]["update_norm_bound"] == "off"
    for bad in (0, -1, "none", 1e13):
        r = api.c.post("/v1/tasks", json={"name": "t", "policy": {"update_norm_bound": bad}}, headers=ADMIN_H)
        assert r.status_code == 422, bad


def test_claimed_sample_count_is_capped_in_the_weighted_mean(api: Api) -> None:
    api.task(rounds=1, policy={"target_reports": 2, "min_reports": 2})
    honest, greedy = api.device(), api.device()
    a1, a2 = api.assignment(honest), api.assignment(greedy)
    base = api.weights(a1["base_version"])
    assert api.upload(honest, a1, api.delta_bytes(a1, 0.01), num_samples=10).status_code == 202
    assert api.upload(greedy, a2, api.delta_bytes(a2, 0.02), num_samples=10**9).status_code == 202
    wait_for(lambda: _round_status(api, a1["round_id"]) == "aggregated")
    new = api.weights(a1["base_version"] + 1)
    cap = DEFAULT_MAX_SAMPLE_WEIGHT
    step = (0.01 * 10 + 0.02 * cap) / (10 + cap)  # uncapped it would be ~0.02
    for name, value in base.items():
        np.testing.assert_allclose(new[name], value + np.float32(step), rtol=1e-5, atol=1e-6)


def test_a_non_finite_model_is_never_stored_the_round_is_abandoned(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    # With the bound explicitly off, two rounds of float32-max-sized updates would overflow the model.
    api.task(rounds=3, policy={"target_reports": 1, "min_reports": 1, "update_norm_bound": "off"})
    dev = api.device()
    a = api.assignment(dev)
    assert api.upload(dev, a, api.delta_bytes(a, 3e38), num_samples=1).status_code == 202
    wait_for(lambda: _round_status(api, a["round_id"]) == "aggregated")
    dev2 = api.device()
    second = api.assignment(dev2)
    assert second["base_version"] == a["base_version"] + 1
    with caplog.at_level(logging.WARNING, logger="facefl.server"):
        assert api.upload(dev2, second, api.delta_bytes(second, 3e38), num_samples=1).status_code == 202
        wait_for(lambda: _round_status(api, second["round_id"]) == "abandoned")
    rnd = api.c.get(f"/v1/rounds/{second['round_id']}", headers=ADMIN_H).json()
    assert "non-finite" in rnd["metrics"]["abandoned_reason"]
    with api.ctx.db.read() as s:
        versions = s.scalars(select(ModelVersion.version)).all()
    assert sorted(versions) == [a["base_version"], second["base_version"]]  # no third version
    for value in api.weights(second["base_version"]).values():
        assert np.isfinite(value).all()
    third = api.assignment(api.device())  # the next round reopened on the last finite version
    assert third["round_id"] != second["round_id"] and third["base_version"] == second["base_version"]
    assert any("non-finite" in r.getMessage() for r in caplog.records)
