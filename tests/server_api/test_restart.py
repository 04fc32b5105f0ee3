"""A real uvicorn process on a real SQLite file: state survives stop/start and SIGKILL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from facefl import codec
from tests.conftest import ADMIN, SECRET, LiveServer

pytestmark = pytest.mark.slow
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


def _register(c: httpx.Client) -> dict[str, str]:
    r = c.post("/v1/devices", json={"enrollment_secret": SECRET})
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _train_and_upload(c: httpx.Client, dev: dict[str, str], value: float) -> dict[str, Any]:
    r = c.post("/v1/checkin", json={}, headers=dev)
    assert r.json()["action"] == "train", r.text
    a = r.json()["assignment"]
    base = codec.decode(c.get(f"/v1/models/{a['base_version']}", headers=dev).content)
    body = codec.encode({k: np.full_like(v, value) for k, v in base.items()})
    r = c.post(
        f"/v1/rounds/{a['round_id']}/updates?num_samples=5",
        content=body,
        headers={**dev, "X-Upload-Token": a["upload_token"]},
    )
    assert r.status_code == 202, r.text
    return a


def _wait_status(c: httpx.Client, round_id: int, status: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rnd = c.get(f"/v1/rounds/{round_id}", headers=ADMIN_H).json()
        if rnd["status"] == status:
            return rnd  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"round {round_id} never became {status}")


def test_rounds_and_versions_survive_restart(tmp_path: Path) -> None:
    server = LiveServer(tmp_path).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            c.post(
                "/v1/tasks", json={"name": "r", "rounds": 3, "policy": {"target_reports": 2}}, headers=ADMIN_H
            )
            devs = [_register(c), _register(c)]
            a = [_train_and_upload(c, d, 0.01) for d in devs]
            _wait_status(c, a[0]["round_id"], "aggregated")
            before = c.get("/v1/tasks/1/rounds", headers=ADMIN_H).json()
            versions_before = c.get("/v1/models", headers=ADMIN_H).json()
        server.stop()
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            assert c.get("/v1/tasks/1/rounds", headers=ADMIN_H).json() == before
            assert c.get("/v1/models", headers=ADMIN_H).json() == versions_before
            task = c.get("/v1/tasks/1", headers=ADMIN_H).json()
            assert task["current_version"] == 2 and task["current_round"]["base_version"] == 2
            b = [_train_and_upload(c, d, 0.02) for d in devs]  # device tokens still valid
            assert b[0]["base_version"] == 2
            rnd = _wait_status(c, b[0]["round_id"], "aggregated")
            info = c.get(f"/v1/models/{rnd['result_version']}/info", headers=ADMIN_H).json()
            assert info["parent_version"] == 2
    finally:
        server.stop()


def test_acknowledged_update_survives_sigkill(tmp_path: Path) -> None:
    server = LiveServer(tmp_path).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            c.post(
                "/v1/tasks", json={"name": "k", "rounds": 1, "policy": {"target_reports": 2}}, headers=ADMIN_H
            )
            devs = [_register(c), _register(c)]
            first = _train_and_upload(c, devs[0], 0.01)  # 202 received ...
        server.kill()  # ... then SIGKILL, no graceful shutdown
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            assert c.get(f"/v1/rounds/{first['round_id']}", headers=ADMIN_H).json()["reported"] == 1
            _train_and_upload(c, devs[1], 0.03)
            rnd = _wait_status(c, first["round_id"], "aggregated")
            assert rnd["metrics"]["reports"] == 2  # the pre-crash update counted exactly once
            r = c.post("/v1/checkin", json={"task_id": 1}, headers=devs[0])
            assert r.json()["reason"] == "task_completed"
    finally:
        server.stop()
