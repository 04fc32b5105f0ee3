"""policy.dp through the server's services on a real SQLite file and blob store: clipping and equal
weights (hand-computed), the server's noise (statistically), no server noise under secure aggregation,
the (epsilon, delta) in round and task, the budget stopping the task, and the refusals (422, nothing
stored)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from facefl import codec
from facefl.privacy.accountant import epsilon_spent, rounds_within_budget
from server_api.app import create_app
from server_api.db import upgrade
from server_api.orm import ModelVersion, Round, Task
from server_api.schemas import CheckinIn, RegisterIn, TrainAction, WaitAction
from server_api.services import aggregation, devices, privacy, rounds, tasks, updates
from server_api.services.context import ServiceContext
from server_api.settings import Settings
from server_api.task_schemas import TaskIn
from tests.conftest import ADMIN, SECRET, make_settings

D = 8 * 48 + 8  # coordinates of the tiny architecture at embedding_dim 8


def _released(
    tmp_path: Path, updates: list[dict[str, np.ndarray]], norms: list[float], clip: float, z: float
) -> dict[str, np.ndarray]:
    """privacy.dp_delta (what aggregation releases under central DP) over these updates as stored files."""
    paths = []
    for i, update in enumerate(updates):
        path = tmp_path / f"u{i}.safetensors"
        path.write_bytes(codec.encode(update))
        paths.append(path)
    policy = privacy.DpPolicy(
        clip_norm=clip, noise_multiplier=z, delta=1e-5, sampling_rate=0.1, epsilon_budget=None
    )
    return privacy.dp_delta(paths, norms, policy)


def test_dp_delta_without_noise_is_the_equal_weight_mean_of_clipped_updates(tmp_path: Path) -> None:
    # x1 = (3, 4) has norm 5, clipped to C = 1: (0.6, 0.8); x2 = (0.3, 0.4) (norm 0.5) stays
    x1 = {"w": np.array([3.0, 4.0], np.float32), "b": np.array([0.0], np.float32)}
    x2 = {"w": np.array([0.3, 0.4], np.float32), "b": np.array([0.0], np.float32)}
    out = _released(tmp_path, [x1, x2], [5.0, 0.5], clip=1.0, z=0.0)
    assert np.allclose(out["w"], [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2])
    assert np.allclose(out["b"], [0.0])
    assert out["w"].dtype == np.float32


def test_dp_delta_noise_is_on_the_sum_then_divided_by_n(tmp_path: Path) -> None:
    n, clip, z = 4, 0.5, 2.0
    updates = [{"w": np.zeros(100_000, np.float32)} for _ in range(n)]
    out = _released(tmp_path, updates, [0.0] * n, clip=clip, z=z)
    assert out["w"].astype(np.float64).std() == pytest.approx(z * clip / n, rel=0.02)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceContext]:
    """The services on a SQLite file and on PostgreSQL (the task status column has a length)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = make_settings(tmp_path, url)
    upgrade(s.database_url)
    context = ServiceContext.from_settings(s)
    try:
        yield context
    finally:
        context.close()


def _create(ctx: ServiceContext, dp: dict[str, Any], rounds_: int = 3) -> int:
    body = TaskIn.model_validate(
        {
            "name": "dp",
            "architecture": "tiny",
            "embedding_dim": 8,
            "rounds": rounds_,
            # three: intake never starts an aggregation itself, the test does
            "policy": {"target_reports": 3, "min_reports": 1, "dp": dp},
        }
    )
    return tasks.create(ctx, body).id


def _weights(ctx: ServiceContext, version: int) -> dict[str, np.ndarray]:
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        assert mv is not None
        key = mv.blob_key
    return dict(codec.load_file(ctx.blobs.path(key)))


def _device(ctx: ServiceContext) -> str:
    token = devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).token
    return devices.authenticate(ctx, token)


def _report(ctx: ServiceContext, value: float, num_samples: int) -> int:
    """A new device reports ``value`` in every coordinate; the round's id."""
    device_id = _device(ctx)
    action = rounds.checkin(ctx, device_id, CheckinIn())
    assert isinstance(action, TrainAction), action
    a = action.assignment
    delta = {k: np.full_like(v, value) for k, v in _weights(ctx, a.base_version).items()}
    target, staged = updates.open_upload(ctx, a.round_id, device_id, a.upload_token)
    try:
        staged.write(codec.encode(delta))
        updates.accept(ctx, target, staged, num_samples=num_samples, metrics={"loss": value})
    finally:
        staged.discard()
    return a.round_id


def _delta(ctx: ServiceContext, new: int, old: int) -> np.ndarray:
    a, b = _weights(ctx, new), _weights(ctx, old)
    return np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in sorted(a)])


def test_updates_are_clipped_and_weigh_the_same_without_noise(ctx: ServiceContext) -> None:
    task_id = _create(ctx, {"clip_norm": 1.0, "noise_multiplier": 0.0, "population": 10})
    round_id = _report(ctx, 0.01, 10)  # norm 0.01 sqrt(D) = 0.198: kept
    _report(ctx, 0.5, 1000)  # norm 0.5 sqrt(D) = 9.9: scaled to norm 1, i.e. 1 / sqrt(D) everywhere
    assert aggregation.aggregate_round(ctx, round_id) == 2
    # equal weights whatever num_samples says: (0.01 + 1 / sqrt(D)) / 2
    np.testing.assert_allclose(_delta(ctx, 2, 1), (0.01 + 1 / math.sqrt(D)) / 2, atol=1e-6)
    with ctx.db.read() as s:
        rnd = s.get(Round, round_id)
        assert rnd is not None
        # the devices' own metrics and sample counts are not covered by the noise: not published
        assert not any(k.startswith("train_") for k in rnd.metrics) and "samples" not in rnd.metrics
        # no noise: no finite epsilon (null), the delta as configured
        assert rnd.metrics["dp_epsilon"] is None and rnd.metrics["dp_delta"] == 1e-5
    privacy = tasks.get(ctx, task_id).privacy
    assert privacy is not None and (privacy.epsilon, privacy.rounds) == (None, 1)


def test_the_server_adds_gaussian_noise_of_z_c_over_n_to_the_mean(any_db_ctx: ServiceContext) -> None:
    ctx = any_db_ctx
    clip, z, population = 1.0, 1.0, 30
    task_id = _create(ctx, {"clip_norm": clip, "noise_multiplier": z, "population": population})
    round_id = _report(ctx, 0.001, 5)
    _report(ctx, 0.003, 50)  # both within the clip norm: the plain equal-weight mean is 0.002
    assert aggregation.aggregate_round(ctx, round_id) == 2
    noise = _delta(ctx, 2, 1) - 0.002
    std = z * clip / 2  # on the sum z C, divided by n = 2
    # D = 392 draws: the sample std is within 20% of the true one except with negligible probability
    # (relative standard error 1 / sqrt(2 D) = 3.6%), and so is the norm, about std sqrt(D)
    assert noise.std() == pytest.approx(std, rel=0.2)
    assert np.linalg.norm(noise) == pytest.approx(std * math.sqrt(D), rel=0.2)
    expected = epsilon_spent(3 / population, z, 1, 1e-5)
    with ctx.db.read() as s:
        rnd = s.get(Round, round_id)
        assert rnd is not None and rnd.metrics["dp_epsilon"] == pytest.approx(expected)
    privacy = tasks.get(ctx, task_id).privacy
    assert privacy is not None and privacy.epsilon == pytest.approx(expected)
    assert privacy.noise_added_by == "server"


def test_under_secure_aggregation_the_devices_add_the_noise(ctx: ServiceContext) -> None:
    """The server never sees one update: the assignment tells each device its share of the noise, with
    DP-FedAvg's clip norm and equal weights (the masked round itself, its noise and its epsilon are tested
    end to end in tests/test_secagg_e2e.py)."""
    from server_api.secagg_policy import assignment_info

    dp = {"clip_norm": 1.0, "noise_multiplier": 2.0, "population": 30}
    body = TaskIn.model_validate(
        {
            "name": "dp",
            "architecture": "tiny",
            "embedding_dim": 8,
            "policy": {
                "target_reports": 3,
                "min_reports": 2,
                "dp": dp,
                "secure_aggregation": {"clip_norm": 5.0},
            },
        }
    )
    task = tasks.create(ctx, body)
    privacy = task.privacy
    assert privacy is not None and privacy.noise_added_by == "devices" and privacy.rounds == 0
    info = assignment_info(task.policy)
    assert info is not None
    assert (info.clip_norm, info.max_sample_weight) == (1.0, 1)
    assert info.noise_stddev == pytest.approx(2.0 * 1.0 / math.sqrt(2))  # z C / sqrt(min_reports)


def test_the_budget_stops_the_task_before_the_round_that_would_exceed_it(any_db_ctx: ServiceContext) -> None:
    ctx = any_db_ctx
    q, z, delta = 3 / 12, 1.0, 1e-5
    budget = (epsilon_spent(q, z, 2, delta) + epsilon_spent(q, z, 3, delta)) / 2
    allowed = rounds_within_budget(q, z, delta, budget, limit=10)
    task_id = _create(
        ctx, {"clip_norm": 1.0, "noise_multiplier": z, "population": 12, "epsilon_budget": budget}, rounds_=10
    )
    for _ in range(allowed):
        assert aggregation.aggregate_round(ctx, _report(ctx, 0.001, 1)) is not None
    out = tasks.get(ctx, task_id)
    assert (out.status, out.aggregated_rounds, out.current_round) == ("budget_exhausted", allowed, None)
    assert out.privacy is not None and out.privacy.epsilon is not None
    assert out.privacy.epsilon <= budget < epsilon_spent(q, z, allowed + 1, delta)
    action = rounds.checkin(ctx, _device(ctx), CheckinIn(task_id=task_id))
    assert isinstance(action, WaitAction) and action.reason == "privacy_budget_exhausted"
    with pytest.raises(Exception) as exc_info:  # final, like completed: 409 task_done
        tasks.resume(ctx, task_id)
    assert getattr(exc_info.value, "status_code", None) == 409


# ------------------------------------------------------------------ refusals through the HTTP API


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


DP = {"clip_norm": 1.0, "noise_multiplier": 1.0, "population": 100}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"algorithm": "fedface", "policy": {"dp": DP}}, "policy.dp"),
        ({"policy": {"dp": DP, "robust": {"trim_fraction": 0.2}, "min_reports": 5}}, "policy.dp"),
        ({"policy": {"dp": DP, "robust": {"clip_norm": 2.0}}}, "policy.dp"),
        ({"policy": {"target_reports": 10, "dp": {**DP, "population": 9}}}, "policy.dp.population"),
        ({"policy": {"dp": {**DP, "noise_multiplier": 0.0, "epsilon_budget": 5.0}}}, "epsilon_budget"),
        ({"policy": {"dp": {**DP, "delta": 0.5}}}, "delta"),
        ({"policy": {"dp": {**DP, "clip_norm": 0}}}, "clip_norm"),
        ({"policy": {"dp": {k: v for k, v in DP.items() if k != "population"}}}, "population"),
        # one round at q = 0.1, z = 1 spends far more than 0.01
        ({"policy": {"dp": {**DP, "epsilon_budget": 0.01}}}, "policy.dp.epsilon_budget"),
        # an accountant that cannot bound epsilon claims no finite value: refused the same way
        (
            {"policy": {"dp": {**DP, "noise_multiplier": 1e-300, "epsilon_budget": 5}}},
            "privacy_budget_too_small",
        ),
    ],
)
def test_refused_with_422_and_nothing_stored(
    client: TestClient, settings: Settings, body: dict[str, Any], says: str
) -> None:
    r = client.post(
        "/v1/tasks",
        json={"name": "t", "architecture": "tiny", **body},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 422, r.text
    assert says in r.text
    ctx = ServiceContext.from_settings(settings)
    try:
        with ctx.db.read() as s:
            assert s.scalar(select(func.count()).select_from(Task)) == 0
            assert s.scalar(select(func.count()).select_from(ModelVersion)) == 0
    finally:
        ctx.close()
