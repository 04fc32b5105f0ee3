"""policy.robust through the real app: trimmed mean and norm clipping change what a round produces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server_api.app import create_app
from tests.conftest import make_settings
from tests.server_api.test_api import ADMIN_H, Api, unchanged, wait_for


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        yield Api(client)


def _round(api: Api, robust: dict[str, Any], values: list[float]) -> dict[str, np.ndarray]:
    """One round with one device per value (delta = that value everywhere); returns new - base."""
    n = len(values)
    # the norm bound is off: these rounds test what robust aggregation does with an accepted outlier
    policy = {"target_reports": n, "min_reports": n, "robust": robust, "update_norm_bound": "off"}
    api.task(rounds=1, policy=policy)
    devs = [api.device() for _ in values]
    assignments = [api.assignment(d) for d in devs]
    for d, a, v in zip(devs, assignments, values, strict=True):
        assert api.upload(d, a, api.delta_bytes(a, v), num_samples=10).status_code == 202
    wait_for(lambda: api.c.get("/v1/tasks/1", headers=ADMIN_H).json()["status"] == "completed")
    base, new = api.weights(1), api.weights(2)
    return {k: new[k] - base[k] for k in base}


def test_trimmed_mean_ignores_an_outlier(api: Api) -> None:
    delta = _round(api, {"trim_fraction": 0.34}, [0.01, 0.02, 100.0])  # k = 1 of 3: the median
    for v in delta.values():
        np.testing.assert_allclose(v, 0.02, atol=1e-4)


def test_norm_clipping_bounds_each_update(api: Api) -> None:
    from facefl.models import build_backbone, state_to_numpy

    size = sum(v.size for v in state_to_numpy(build_backbone("small", embedding_dim=128, seed=0)).values())
    # both updates clipped to norm 0.01 * sqrt(size): the 1.0 update counts as 0.01 everywhere
    delta = _round(api, {"clip_norm": 0.01 * size**0.5}, [0.01, 1.0])
    for v in delta.values():
        np.testing.assert_allclose(v, 0.01, atol=1e-4)


def test_without_robust_the_outlier_moves_the_mean(api: Api) -> None:
    delta = _round(api, {}, [0.01, 0.02, 3.0])  # robust present but neutral: weighted mean
    for v in delta.values():
        np.testing.assert_allclose(v, 1.01, atol=1e-3)


@pytest.mark.parametrize(
    "robust",
    [{"trim_fraction": 0.2}, {"trim_fraction": 0.5}, {"clip_norm": 0}, {"clip_norm": -1}, {"trim": 0.1}],
)
def test_invalid_robust_settings_are_refused(api: Api, robust: dict[str, Any]) -> None:
    body = {"name": "t", "policy": {"target_reports": 4, "min_reports": 2, "robust": robust}}
    r = unchanged(api, lambda: api.c.post("/v1/tasks", json=body, headers=ADMIN_H))
    assert r.status_code == 422, r.text
