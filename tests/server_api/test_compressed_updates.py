"""Compressed updates end to end: the task's update_encoding reaches devices, int8/float16 uploads are
validated on their decoded values and aggregated; hostile encodings are refused and change nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from device_sdk.client import Assignment
from facefl import codec, compression
from facefl.algorithms.local import LocalJob
from facefl.device_state import FEEDBACK_FILE
from server_api.app import create_app
from server_api.orm import Assignment as AssignmentRow
from server_api.orm import Update
from server_api.services.context import ServiceContext
from tests.conftest import ADMIN, SECRET, make_settings

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with TestClient(create_app(make_settings(tmp_path, url))) as c:
        yield c


def _ctx(client: TestClient) -> ServiceContext:
    return client.app.state.ctx  # type: ignore[attr-defined,no-any-return]


def _task(client: TestClient, **policy: Any) -> dict[str, Any]:
    body = {
        "name": "compressed",
        "architecture": "tiny",
        "rounds": 2,
        "policy": {"target_reports": 2, "min_reports": 2, "round_timeout_s": 600, **policy},
    }
    r = client.post("/v1/tasks", json=body, headers=ADMIN_H)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _device(client: TestClient) -> tuple[dict[str, str], dict[str, Any]]:
    r = client.post("/v1/devices", json={"enrollment_secret": SECRET})
    assert r.status_code == 201, r.text
    headers = {"Authorization": f"Bearer {r.json()['token']}"}
    r = client.post("/v1/checkin", json={}, headers=headers)
    assert r.status_code == 200 and r.json()["action"] == "train", r.text
    return headers, r.json()["assignment"]


def _upload(client: TestClient, dev: dict[str, str], a: dict[str, Any], body: bytes, n: int = 10) -> Any:
    return client.post(
        f"/v1/rounds/{a['round_id']}/updates?num_samples={n}",
        content=body,
        headers={**dev, "X-Upload-Token": a["upload_token"]},
    )


def _weights(client: TestClient, version: int) -> dict[str, np.ndarray]:
    r = client.get(f"/v1/models/{version}", headers=ADMIN_H)
    assert r.status_code == 200
    return codec.decode(r.content)


def _delta(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in base.items()}


def _snapshot(client: TestClient) -> tuple[int, int, int]:
    ctx = _ctx(client)
    with ctx.db.read() as s:
        updates = s.scalar(select(func.count()).select_from(Update)) or 0
        reported = (
            s.scalar(select(func.count()).select_from(AssignmentRow).where(AssignmentRow.reported)) or 0
        )
    return updates, reported, ctx.blobs.count()


def test_int8_and_float16_updates_are_validated_stored_and_aggregated(client: TestClient) -> None:
    _task(client, update_encoding="int8_channel", update_error_feedback=True)
    (d1, a1), (d2, a2) = _device(client), _device(client)
    assert (a1["update_encoding"], a1["update_error_feedback"]) == ("int8_channel", True)
    base = _weights(client, a1["base_version"])
    bodies = [
        compression.encode_payload(_delta(base, 1), "int8_channel"),
        compression.encode_payload(_delta(base, 2), "float16"),  # any encoding is accepted
    ]
    assert len(bodies[0]) < 0.4 * len(codec.encode(_delta(base, 1)))
    assert _upload(client, d1, a1, bodies[0], n=10).status_code == 202
    assert _upload(client, d2, a2, bodies[1], n=30).status_code == 202
    ctx = _ctx(client)
    with ctx.db.read() as s:
        keys = [u.blob_key for u in s.scalars(select(Update).order_by(Update.id))]
    stored = ctx.blobs.path(keys[0]).read_bytes()
    assert stored == bodies[0]  # stored as sent: int8 values and their scales
    deadline = time.monotonic() + 30
    while client.get(f"/v1/rounds/{a1['round_id']}", headers=ADMIN_H).json()["status"] != "aggregated":
        assert time.monotonic() < deadline, "the round did not aggregate"
        time.sleep(0.05)
    after = _weights(client, 2)
    decoded = [compression.decode_payload(b) for b in bodies]
    for name, value in base.items():
        mean = (10 * decoded[0][name].astype(np.float64) + 30 * decoded[1][name]) / 40
        np.testing.assert_allclose(after[name], value + mean, rtol=1e-5, atol=1e-6)


def test_float32_upload_to_an_int8_task_is_accepted(client: TestClient) -> None:
    """Devices built before compression send float32: the server takes it whatever the task asks."""
    _task(client, update_encoding="int8")
    dev, a = _device(client)
    body = codec.encode(_delta(_weights(client, a["base_version"]), 3))
    assert _upload(client, dev, a, body).status_code == 202


def _hostile(base: dict[str, np.ndarray], case: str) -> bytes:
    wire = compression.encode_update(_delta(base, 4), "int8_channel")
    name = next(n for n in wire if n.endswith(compression.SCALE_SUFFIX))
    if case == "nan_scale":
        wire[name] = np.full_like(wire[name], np.nan)
    elif case == "negative_scale":
        wire[name] = -np.abs(wire[name])
    elif case == "huge_scale":
        wire[name] = np.full_like(wire[name], 3e38)
    elif case == "scale_shape":
        wire[name] = np.ones(wire[name].size + 1, np.float32)
    elif case == "scale_dtype":
        wire[name] = wire[name].astype(np.float16)
    elif case == "no_scale":
        del wire[name]
    elif case == "orphan_scale":
        wire["nothing" + compression.SCALE_SUFFIX] = np.ones(1, np.float32)
    elif case == "int16":
        q = name[: -len(compression.SCALE_SUFFIX)]
        wire[q] = wire[q].astype(np.int16)
    elif case == "norm":  # finite, but the decoded values are far above the task's norm bound
        wire[name] = np.full_like(wire[name], 1e3)
    return codec.encode(wire)


@pytest.mark.parametrize(
    "case",
    ["nan_scale", "negative_scale", "huge_scale", "scale_shape", "scale_dtype", "no_scale", "orphan_scale",
     "int16", "norm"],
)  # fmt: skip
def test_hostile_encoded_updates_are_422_and_change_nothing(client: TestClient, case: str) -> None:
    _task(client, update_encoding="int8_channel", update_norm_bound=1000.0)
    dev, a = _device(client)
    base = _weights(client, a["base_version"])
    before = _snapshot(client)
    r = _upload(client, dev, a, _hostile(base, case))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == ("norm_too_large" if case == "norm" else "bad_update")
    assert _snapshot(client) == before
    good = compression.encode_payload(_delta(base, 5), "int8_channel")
    assert _upload(client, dev, a, good).status_code == 202  # the token was not consumed


def test_the_sdk_reads_the_encoding_and_falls_back_to_float32() -> None:
    data = {
        "round_id": 1, "task_id": 1, "round_number": 1, "base_version": 1, "algorithm": "fedavg",
        "architecture": "tiny", "upload_token": "t",
    }  # fmt: skip
    old_server = Assignment.from_json(data)
    assert (old_server.update_encoding, old_server.update_error_feedback) == ("float32", False)
    int8 = Assignment.from_json({**data, "update_encoding": "int8", "update_error_feedback": True})
    assert (int8.update_encoding, int8.update_error_feedback) == ("int8", True)
    assert Assignment.from_json({**data, "update_encoding": "int2"}).update_encoding == "float32"


def test_local_job_applies_error_feedback_across_rounds(tmp_path: Path) -> None:
    base = {"w": np.zeros((2, 2), np.float32)}
    local = {"w": np.array([[1.0, 0.004], [0.5, -0.25]], np.float32)}
    assignment = SimpleNamespace(update_encoding="int8", update_error_feedback=True)
    job = LocalJob(assignment, base, None, tmp_path, None)  # type: ignore[arg-type]
    first = job.delta(local, ["w"])
    np.testing.assert_array_equal(first["w"], local["w"])  # nothing dropped yet
    residual = codec.load_file(tmp_path / FEEDBACK_FILE)["w"]
    sent = compression.decode_update(compression.encode_update(first, "int8"))["w"]
    np.testing.assert_allclose(residual, first["w"] - sent, atol=1e-7)
    second = job.delta(local, ["w"])  # the next round: what was dropped comes back
    np.testing.assert_allclose(second["w"], local["w"] + residual, atol=1e-7)
    off = LocalJob(SimpleNamespace(), base, None, tmp_path / "off", None)  # type: ignore[arg-type]
    np.testing.assert_array_equal(off.delta(local, ["w"])["w"], local["w"])
    assert not (tmp_path / "off").exists()
