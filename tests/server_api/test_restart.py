"""A real uvicorn process on a real SQLite file: state survives stop/start and SIGKILL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_sdk import AdminClient, RoundInfo
from facefl import codec
from tests.conftest import ADMIN, SECRET, LiveServer

pytestmark = pytest.mark.slow


def _admin(server: LiveServer) -> AdminClient:
    return AdminClient(server.base_url, ADMIN, timeout=30)


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


def _wait_aggregated(admin: AdminClient, round_id: int) -> RoundInfo:
    rnd = admin.wait_for_round(round_id, timeout_s=30)
    assert rnd.status == "aggregated", f"round {round_id} closed as {rnd.status}"
    return rnd


def test_rounds_and_versions_survive_restart(tmp_path: Path) -> None:
    server = LiveServer(tmp_path).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as c, _admin(server) as admin:
            admin.create_task("r", rounds=3, policy={"target_reports": 2})
            devs = [_register(c), _register(c)]
            a = [_train_and_upload(c, d, 0.01) for d in devs]
            _wait_aggregated(admin, a[0]["round_id"])
            # every field the server sends (raw), timestamps included
            before = [r.raw for r in admin.task_rounds(1)]
            versions_before = [v.raw for v in admin.list_models()]
        server.stop()
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=30) as c, _admin(server) as admin:
            assert [r.raw for r in admin.task_rounds(1)] == before
            assert [v.raw for v in admin.list_models()] == versions_before
            task = admin.get_task(1)
            assert task.current_version == 2
            assert task.current_round is not None and task.current_round.base_version == 2
            b = [_train_and_upload(c, d, 0.02) for d in devs]  # device tokens still valid
            assert b[0]["base_version"] == 2
            rnd = _wait_aggregated(admin, b[0]["round_id"])
            assert rnd.result_version is not None
            assert admin.model_info(rnd.result_version).parent_version == 2
    finally:
        server.stop()


def test_acknowledged_update_survives_sigkill(tmp_path: Path) -> None:
    server = LiveServer(tmp_path).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as c, _admin(server) as admin:
            admin.create_task("k", rounds=1, policy={"target_reports": 2})
            devs = [_register(c), _register(c)]
            first = _train_and_upload(c, devs[0], 0.01)  # 202 received ...
        server.kill()  # ... then SIGKILL, no graceful shutdown
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=30) as c, _admin(server) as admin:
            assert admin.get_round(first["round_id"]).reported == 1
            _train_and_upload(c, devs[1], 0.03)
            rnd = _wait_aggregated(admin, first["round_id"])
            assert rnd.metrics["reports"] == 2  # the pre-crash update counted exactly once
            r = c.post("/v1/checkin", json={"task_id": 1}, headers=devs[0])
            assert r.json()["reason"] == "task_completed"
    finally:
        server.stop()
