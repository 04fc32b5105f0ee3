"""FedAdam through the ASGI app: devices get a fedavg assignment, the server step applies Adam, and the
moments live with the model version, so a restarted server continues from them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from facefl.algorithms.fedavgm import is_statistic
from server_api.app import create_app
from server_api.orm import ModelVersion
from tests.conftest import make_settings
from tests.server_api.test_api import ADMIN_H, Api, wait_for

HP = {"server_lr": 0.1, "beta1": 0.5, "beta2": 0.5, "tau": 0.5, "batch_size": 8}


def _round(api: Api, value: float) -> dict[str, Any]:
    d1, d2 = api.device(), api.device()
    a1, a2 = api.assignment(d1), api.assignment(d2)
    for dev, a in ((d1, a1), (d2, a2)):
        assert api.upload(dev, a, api.delta_bytes(a, value), num_samples=10).status_code == 202
    url = f"/v1/rounds/{a1['round_id']}"
    wait_for(lambda: api.c.get(url, headers=ADMIN_H).json()["status"] == "aggregated")
    return a1


def test_fedadam_moments_live_with_the_version_and_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_upload_bytes=4 * 1024 * 1024)
    with TestClient(create_app(settings)) as client:
        api = Api(client)
        task = api.task(algorithm="fedadam", hyperparams=HP, policy={"target_reports": 2, "min_reports": 1})
        assert task["algorithm"] == "fedadam" and task["hyperparams"]["beta1"] == 0.5
        a = _round(api, 0.01)
        # devices train FedAvg's local update: a device built before FedAdam existed takes part
        assert a["algorithm"] == "fedavg" and a["hyperparams"]["batch_size"] == 8
        v1, v2 = api.weights(1), api.weights(2)
        with api.ctx.db.read() as s:
            mv = s.get(ModelVersion, 2)
            assert mv is not None and mv.server_state_key is not None
    # m1 = 0.5 * 0.01 ; v1 = 0.5 * tau^2 + 0.5 * 1e-4 ; step = lr * m1 / (sqrt(v1) + tau)
    m1, var1 = 0.005, 0.5 * 0.25 + 0.5 * 1e-4
    step1 = 0.1 * m1 / (math.sqrt(var1) + 0.5)
    for k in v1:
        expected = 0.01 if is_statistic(k) else step1
        np.testing.assert_allclose(v2[k] - v1[k], expected, rtol=1e-3, atol=1e-7, err_msg=k)

    with TestClient(create_app(settings)) as client:  # a restarted server, same database and blobs
        api = Api(client)
        _round(api, -0.01)
        v3 = api.weights(3)
    m2, var2 = 0.5 * m1 - 0.005, 0.5 * var1 + 0.5 * 1e-4
    step2 = 0.1 * m2 / (math.sqrt(var2) + 0.5)
    name = next(k for k in v1 if not is_statistic(k))
    np.testing.assert_allclose(v3[name] - v2[name], step2, rtol=1e-3, atol=1e-7)
    # without the stored moments the step would be a fresh start's, -step1
    assert abs(step2 - (-step1)) > 1e-4


def test_hyperparams_of_another_algorithm_are_refused(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        r = client.post(
            "/v1/tasks",
            json={"name": "x", "algorithm": "fedavg", "hyperparams": {"tau": 0.1}},
            headers=ADMIN_H,
        )
        assert r.status_code == 422 and "hyperparams.tau applies to fedadam and fedyogi only" in r.text
        r = client.post(
            "/v1/tasks",
            json={"name": "x", "algorithm": "fedyogi", "hyperparams": {"tau": 0}},
            headers=ADMIN_H,
        )
        assert r.status_code == 422 and "hyperparams.tau" in r.text
